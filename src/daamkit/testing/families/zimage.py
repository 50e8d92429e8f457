"""Z-Image: a tiny offline ``ZImagePipeline`` and a Qwen3 tokenizer.

The denoiser, ``ZImageTransformer2DModel``, is single-stream: per sample it packs the image tokens and the
caption tokens into one sequence [image, caption], each part padded with a learnt pad token to a multiple of
32, refines each part alone first (``noise_refiner``: image only, ``context_refiner``: caption only) and
then runs the main ``layers`` over the joint sequence. The caption is the Qwen3 chat-templated prompt
(second-to-last hidden state), every template token kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from daamkit.testing.families.qwenimage import QWEN2_5_ADDED_TOKENS, qwen_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Model

# Qwen3 adds these after the Qwen2.5 tokens (ids 151665-151668).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = QWEN2_5_ADDED_TOKENS + (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# The chat template of the Qwen3 tokenizer (Qwen/Qwen3-4B, Z-Image's text encoder).
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# What ZImagePipeline's ``apply_chat_template(..., add_generation_prompt=True, enable_thinking=True)`` makes of
# one user message: no system turn, no think block.
ZIMAGE_PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def qwen3_tokenizer(out_dir: str | Path) -> Qwen2Tokenizer:
    """The Qwen3 tokenizer of Z-Image (``Qwen2Tokenizer``, Qwen3's added tokens and chat template)."""
    return qwen_tokenizer(
        out_dir,
        added_tokens=QWEN3_ADDED_TOKENS,
        chat_template=QWEN3_CHAT_TEMPLATE,
        templates=(ZIMAGE_PROMPT_TEMPLATE,),
        model_max_length=131072,
    )


def tiny_qwen3(tokenizer: Qwen2Tokenizer, seed: int = 0, hidden: int = 16) -> Qwen3Model:
    """A random ``Qwen3Model`` sized for ``tokenizer``: two layers (the pipeline reads ``hidden_states[-2]``)."""
    from transformers import Qwen3Config, Qwen3Model

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=2048,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def tiny_zimage_transformer(
    seed: int = 0, cap_feat_dim: int = 16, in_channels: int = 16
) -> ZImageTransformer2DModel:
    """``ZImageTransformer2DModel`` with every block kind: noise refiner, context refiner and main layers."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=in_channels,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=cap_feat_dim,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[1536, 512, 512],
    )


def tiny_zimage_vae(seed: int = 0, latent_channels: int = 16) -> AutoencoderKL:
    """A Flux-style ``AutoencoderKL``: four blocks (8 px per latent), 16 latent channels, Flux's scale/shift."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_zimage(tokenizer_dir: str | Path, seed: int = 0) -> ZImagePipeline:
    """A tiny ``ZImagePipeline`` (fp32, CPU) driven by the tokenizer saved in ``tokenizer_dir``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(str(tokenizer_dir))
    transformer = tiny_zimage_transformer(seed)
    vae = tiny_zimage_vae(seed)
    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler()
    text_encoder = tiny_qwen3(tokenizer, seed)
    return ZImagePipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
    )
