"""daamkit: Diffusion Attentive Attribution Maps for diffusers pipelines.

```python
from daamkit import trace
with trace(pipe) as tc:
    image = pipe("a dog on a bench").images[0]
    dog = tc.heat_maps(0).word("dog")
```
"""

from daamkit._version import __version__ as __version__
from daamkit.aggregate import AggregationConfig, LayerInfo
from daamkit.capture import SUPPORTED_FAMILIES, UnsupportedPipelineError
from daamkit.io.runs import Runs, load_runs
from daamkit.trace import Trace, TraceError, trace

__all__ = [
    "AggregationConfig",
    "LayerInfo",
    "Runs",
    "SUPPORTED_FAMILIES",
    "Trace",
    "TraceError",
    "UnsupportedPipelineError",
    "load_runs",
    "trace",
]
