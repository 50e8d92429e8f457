"""FLUX.2: ``Flux2Pipeline`` (Mistral Small 3.1 text encoder behind a Pixtral processor) and
``Flux2KleinPipeline`` (Qwen3 text encoder), both on ``Flux2Transformer2DModel``, built offline at test size.

The tokenizers are byte-level BPEs trained here on short sentences of :data:`T5_WORDS`, with the real
special tokens (Mistral's at their real ids 0-19, Qwen3's added after the vocabulary in their real order), the
real chat templates and the real padding sides (Mistral pads on the left, Qwen3 on the right), so that the
pipelines' ``encode_prompt`` runs unchanged. Regular token ids differ from the real vocabularies.

The text encoders have as many layers as the pipelines' default ``text_encoder_out_layers`` need
((10, 20, 30) for Mistral, (9, 18, 27) for Qwen3): the default call works, and the layers are 16 wide so that
512 text tokens cost little.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from daamkit.testing.tokenizers import T5_WORDS

# Mistral's special tokens at their ids in the tekken vocabulary of Mistral Small 3.1 (ids 20-999 are unused
# <SPECIAL_n> placeholders there and left out here).
MISTRAL_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)

# The processor chat template of mistralai/Mistral-Small-3.1-24B-Instruct-2503 (which FLUX.2 loads its processor
# from). The system turn arrives as a list of text blocks (``format_input``), hence ``content[0]['text']``.
MISTRAL_SMALL_31_CHAT_TEMPLATE = (
    '{%- set today = strftime_now("%Y-%m-%d") %}\n'
    '{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, '
    "a French startup headquartered in Paris.\\nYour knowledge base was last updated on 2023-10-01. The current "
    'date is " + today + ".\\n\\nWhen you\'re not sure about some information, you say that you don\'t have the '
    "information and don't make up anything.\\nIf the user's question is not clear, ambiguous, or does not provide "
    "enough context for you to accurately answer the question, you do not try to answer it right away and you "
    'rather ask the user to clarify their request (e.g. \\"What are some good restaurants around me?\\" => '
    '\\"Where are you?\\" or \\"When is the next flight to Tokyo\\" => \\"Where do you travel from?\\")" %}\n\n'
    "{{- bos_token }}\n\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- if messages[0] is string %}\n"
    "        {%- set system_message = messages[0]['content'] %}\n"
    "        {%- set loop_messages = messages[1:] %}\n"
    "    {%- else %} \n"
    "        {%- set system_message = messages[0]['content'][0]['text'] %}\n"
    "        {%- set loop_messages = messages[1:] %}\n"
    "    {%- endif %}\n"
    "{%- else %}\n"
    "    {%- set system_message = default_system_message %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}\n\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "            {%- if message['content'] is string %}\n"
    "            {{- '[INST]' + message['content'] + '[/INST]' }}\n"
    "            {%- else %}\n"
    "                    {{- '[INST]' }}\n"
    "                    {%- for block in message['content'] %}\n"
    "                            {%- if block['type'] == 'text' %}\n"
    "                                    {{- block['text'] }}\n"
    "                            {%- elif block['type'] == 'image' or block['type'] == 'image_url' %}\n"
    "                                    {{- '[IMG]' }}\n"
    "                                {%- else %}\n"
    "                                    {{- raise_exception('Only text and image blocks are supported in message content!') }}\n"
    "                                {%- endif %}\n"
    "                        {%- endfor %}\n"
    "                    {{- '[/INST]' }}\n"
    "                {%- endif %}\n"
    "    {%- elif message['role'] == 'system' %}\n"
    "        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {%- if message['content'] is string %}\n"
    "            {{- message['content'] + eos_token }}\n"
    "        {%- else %}\n"
    "            {{- message['content'][0]['text'] + eos_token }}\n"
    "        {%- endif %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user, system and assistant roles are supported!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}"
)

# Qwen3's added tokens in their order (ids 151643-151668 in the real vocabulary); all but the first 22 are
# ordinary (non-special) added tokens, as in Qwen/Qwen3-4B.
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
QWEN3_PLAIN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)

# The chat template of Qwen/Qwen3-4B (hybrid thinking); Klein renders it with enable_thinking=False, which
# closes an empty think block after the generation prompt.
QWEN3_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided '
    'with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') "
    "and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {%- set content = message.content %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}"
)

# The split of Qwen2/Qwen3's tokenizer (transformers' Qwen2Tokenizer) before byte-level BPE.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _sentences(words: Sequence[str], n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice((".", ",", "!", ""))
        for _ in range(n)
    ]


def _train_byte_bpe(sentences: Sequence[str], special_tokens: Sequence[str], pre_tokenizer, vocab_size: int):
    """A byte-level BPE (all 256 bytes in the alphabet, so any text encodes) with ``special_tokens`` at ids 0...

    ``pre_tokenizer`` decides how words carry their leading space (``Ġdog``), as in the real tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer)
    return tok


def mistral3_tokenizer(out_dir: str | Path, words: Sequence[str] = T5_WORDS, vocab_size: int = 640):
    """A tokenizer like FLUX.2's (Mistral Small 3.1's), with its chat template, saved to ``out_dir``.

    Tekken-like byte-level BPE, special tokens at their real ids (``<s>`` 1, ``[INST]`` 3, ``[IMG]`` 10, ``<pad>``
    11, ``[SYSTEM_PROMPT]`` 17), left padding, the real chat template. Besides sentences of ``words`` the BPE
    learns FLUX.2's system message, so that the chat prefix stays about as short as with the real vocabulary
    and prompts fit in short ``max_sequence_length`` values.

    The real pipeline holds a ``PixtralProcessor``, which needs torchvision. Its ``apply_chat_template`` renders
    the same template and tokenizes the text without adding special tokens (the text starts with ``<s>``), as the
    tokenizer's own ``apply_chat_template`` does, so the tokenizer alone gives the pipeline the same ids. Only
    caption upsampling (``caption_upsample_temperature``, which also needs the processor's images) is out of reach.
    """
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sents = _sentences(words) + [SYSTEM_MESSAGE] * 50
    bpe = _train_byte_bpe(
        sents, MISTRAL_SPECIAL_TOKENS, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), vocab_size
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=MISTRAL_SMALL_31_CHAT_TEMPLATE,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return PreTrainedTokenizerFast.from_pretrained(str(out))


def qwen3_tokenizer(out_dir: str | Path, words: Sequence[str] = T5_WORDS, vocab_size: int = 400):
    """A ``Qwen2TokenizerFast`` like Qwen3's (FLUX.2 Klein's), saved to ``out_dir``.

    Qwen's regex split + byte-level BPE, NFC; ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos),
    ..., ``<think>``, ``</think>`` added after the vocabulary in their real order; right padding; the real chat
    template.
    """
    from tokenizers import AddedToken, Regex, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # The chat template's role names and blank lines are single tokens in the real vocabulary.
    sents = _sentences(words) + ["user", "assistant", "system", "\n\n"] * 50
    bpe = _train_byte_bpe(sents, (), pre, vocab_size)
    vocab = bpe.get_vocab()
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]
    # Placing the added tokens in the vocabulary fixes their ids in the real order (the tokenizer would otherwise
    # add its eos and pad first).
    added = QWEN3_SPECIAL_TOKENS + QWEN3_PLAIN_ADDED_TOKENS
    vocab.update({t: len(vocab) + i for i, t in enumerate(added)})
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_PLAIN_ADDED_TOKENS])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return Qwen2TokenizerFast.from_pretrained(str(out))


# ----------------------------------------------------------------------------------------- pipelines ---
TEXT_HIDDEN = 16  # width of the tiny text encoders; the transformer's context is 3 stacked layers of it


def tiny_flux2_transformer(seed: int = 0, guidance_embeds: bool = True):
    """``Flux2Transformer2DModel`` at diffusers' test size (one double- and one single-stream block)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    )


def _flux2_vae(seed: int):
    """One block (``vae_scale_factor`` 1) and one latent channel: the 2x2 patchify gives the transformer's 4."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    return AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    )


def _vocab_size(tokenizer) -> int:
    return 64 * ((len(tokenizer) + 63) // 64)


def tiny_flux2(tokenizer_dir: str, seed: int = 0):
    """``Flux2Pipeline`` (FLUX.2 [dev]): guidance-distilled transformer, 30-layer tiny Mistral 3 text encoder.

    ``tokenizer_dir`` comes from :func:`mistral3_tokenizer`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import AutoTokenizer, Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    transformer = tiny_flux2_transformer(seed, guidance_embeds=True)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": _vocab_size(tokenizer), "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 32, "max_position_embeddings": 1024, "num_attention_heads": 4,
            "num_hidden_layers": 30, "num_key_value_heads": 2, "head_dim": 4, "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 11,
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
            "intermediate_size": 32, "image_size": 30, "patch_size": 6, "num_channels": 3,
        },
        bos_token_id=1, eos_token_id=2, pad_token_id=11, image_token_index=10, vision_feature_layer=-1,
        spatial_merge_size=2,
    )
    torch.manual_seed(seed + 1)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux2_vae(seed + 2), text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux2_klein(tokenizer_dir: str, seed: int = 0, is_distilled: bool = False):
    """``Flux2KleinPipeline`` (FLUX.2 [klein]): no guidance embedding, 27-layer tiny Qwen3 text encoder.

    ``tokenizer_dir`` comes from :func:`qwen3_tokenizer`. ``is_distilled=False`` (the base models) runs true CFG
    for ``guidance_scale > 1``; the step-distilled klein models set it True.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tokenizer = Qwen2TokenizerFast.from_pretrained(tokenizer_dir)
    transformer = tiny_flux2_transformer(seed, guidance_embeds=False)
    config = Qwen3Config(
        vocab_size=_vocab_size(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=27,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3ForCausalLM(config).eval()
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux2_vae(seed + 2), text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=transformer, is_distilled=is_distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
