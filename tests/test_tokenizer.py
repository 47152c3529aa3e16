"""The demo checkpoint's tokenizer is the real Qwen3 one: ids match tiktoken on the same ranks, chat template works."""

import unicodedata

import pytest
import tiktoken
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from nanovllm_ray.demo_model import ensure_demo_checkpoint
from nanovllm_ray.tokenizer_files import NUM_BPE_TOKENS, PRETOKENIZE_REGEX, QWEN3_ADDED_TOKENS, load_qwen_ranks

CORPUS = [
    "Hello world",
    "hello world",
    " Hello  world ",
    "HELLO WORLD!!!",
    "",
    " ",
    "   ",
    "\t\t",
    "\n",
    "\n\n\n",
    "a\r\nb\r\n\r\nc",
    "line one\nline two\n\n  indented\n\tTabbed",
    "trailing spaces   \nnext",
    "12345678901234567890",
    "3.14159 + 2.71828 = 5.85987",
    "1,000,000 and 1e-6 and 0x1F and -42",
    "2024-06-01T12:34:56Z",
    "I'm sure you'll see they've said it's 'fine', I'd think we're OK",
    "DON'T SHOUT, WE'LL HEAR YOU'RE HERE",
    "the cat's whiskers",
    "你好",
    "你好，世界！今天天气很好。",
    "中文和English混合mixed文本123",
    "日本語のテキストとカタカナ",
    "한국어 텍스트입니다",
    "Привет, мир! Как дела?",
    "Ελληνικά γράμματα",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी पाठ",
    "ไทย ภาษา",
    "café naïve façade résumé",
    "cafe\u0301 (decomposed e + combining acute)",
    "😀😃😄 emoji 🚀🔥 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "mixed 🙂 text with 表情 and numbers 42",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    'print("hello, world!")\n',
    '<div class="a">&nbsp;&amp;</div>',
    "SELECT * FROM users WHERE id = 1;",
    "https://example.com/path?query=1&b=2#frag",
    "user@example.com",
    "$$\\frac{a}{b} = \\sum_{i=1}^{n} x_i$$",
    "!!!???...,,,;;;:::",
    "----====____****",
    "a  b   c    d     e",
    "\u00a0non-breaking\u2003em space\u3000ideographic",
    "zero\u200bwidth",
    "<b>not</b> an added token: <|im_star|> <thinking>",
    "x" * 300,
    "The quick brown fox jumps over the lazy dog. " * 5,
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", shape="tiny")


@pytest.fixture(scope="session")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def tiktoken_enc():
    return tiktoken.Encoding("qwen", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=load_qwen_ranks(), special_tokens={})


def test_known_ids(tok):
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok("你好")["input_ids"] == [108386]
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("<think>") == 151667
    assert tok.convert_tokens_to_ids("</think>") == 151668
    assert len(tok) == 151669


def test_added_tokens_in_order(tok):
    for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(content) == NUM_BPE_TOKENS + i
        assert tok.decode([NUM_BPE_TOKENS + i]) == content
    # Added tokens in text become single ids; no BOS is prepended.
    assert tok("<|im_start|>user\nhi<|im_end|>")["input_ids"] == [151644, 872, 198, 6023, 151645]


def test_special_roles(tok):
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None
    assert tok.model_max_length == 131072
    # Only the first 14 added tokens are special: skip_special_tokens keeps <think> and <tool_call>, like Qwen3.
    ids = tok("<|im_start|><think>a</think><tool_call><|vision_pad|><|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think><tool_call>"


def test_decode_round_trip(tok):
    text = "Mixed: 你好世界 😀🚀\n\ndef f(x):\n    return {'a': [1, 2, 3]}\r\n\ttab — dash «quotes» ñ"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", CORPUS)
def test_matches_tiktoken(tok, tiktoken_enc, text):
    # Qwen's own tiktoken tokenizer NFC-normalizes first, as the HF tokenizer's normalizer does.
    expected = tiktoken_enc.encode_ordinary(unicodedata.normalize("NFC", text))
    assert tok(text)["input_ids"] == expected
    assert tok.decode(expected) == unicodedata.normalize("NFC", text)


def test_tokenizer_json_loads_without_transformers(model_dir, tiktoken_enc):
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert raw.get_vocab_size() == 151669
    for text in CORPUS:
        assert raw.encode(text).ids == tiktoken_enc.encode_ordinary(unicodedata.normalize("NFC", text))


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]
RENDERED = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n"
    "<|im_start|>user\n2+2?<|im_end|>\n"
)


def test_chat_template_generation_prompt(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == RENDERED + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True, return_dict=True)
    ids = ids["input_ids"]
    assert ids == tok(text)["input_ids"]
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n
    assert ids.count(151645) == 4
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED


def test_chat_template_thinking_switch(tok):
    off = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == RENDERED + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tok(off)["input_ids"]
    assert ids[-4:] == [151667, 271, 151668, 271]  # <think> \n\n </think> \n\n
    on = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on == RENDERED + "<|im_start|>assistant\n"


def test_chat_template_tools(tok):
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "24C"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n24C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="Unsupported chat role: narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_load_tokenizer_is_autotokenizers_without_torch(model_dir, tok):
    """load_tokenizer takes the class tokenizer_config.json names (AutoTokenizer's choice, same ids and chat prompt)
    without importing torch: the HTTP ingress loads it and needs no torch (3-4 s of its start)."""
    import subprocess
    import sys

    from nanovllm_ray.engine.llm_engine import load_tokenizer

    ours = load_tokenizer(str(model_dir))
    assert type(ours) is type(tok)
    for text in CORPUS:
        assert ours.encode(text) == tok.encode(text), text
    chat = [{"role": "user", "content": "hi there"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == tok.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False)
    code = ("import sys\nimport deployments.app\nfrom nanovllm_ray.engine.llm_engine import load_tokenizer\n"
            f"load_tokenizer({str(model_dir)!r})\nprint('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout


def test_load_tokenizer_falls_back_to_autotokenizer(model_dir, tmp_path):
    """A tokenizer_config.json without a class transformers has: AutoTokenizer's answer all the same."""
    import json
    import shutil

    from nanovllm_ray.engine.llm_engine import load_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "NoSuchTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        fallback = AutoTokenizer.from_pretrained(tmp_path)
    except Exception:
        pytest.skip("AutoTokenizer cannot load it either")
    assert load_tokenizer(str(tmp_path)).encode("Hello world") == fallback.encode("Hello world")
