"""The last user turn of a rendered chat prompt (``engines/chat_prompt.py``): what the vLLM
plug-in gives a ``last_user`` bundle instead of the whole decoded template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ecoserve_sched.engines.chat_prompt import turn_markers
from rlpredict.rl_tokenizers import tokenizer_path

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is TCP?"},
        {"role": "assistant", "content": "A protocol."}, {"role": "user", "content": "Explain it in detail,\nstep by step."}]


def _tokenizer(name: str, template: str | None = None) -> AutoTokenizer:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path(name).parent))
    if template is not None:
        tok.chat_template = template
    return tok


def _rendered(tok: AutoTokenizer, messages: list[dict]) -> str:
    """What the plug-in decodes: the template's ids, special tokens kept."""
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return tok.decode(ids["input_ids"] if hasattr(ids, "keys") else ids, skip_special_tokens=False)


@pytest.mark.parametrize("name,template,markers", [
    ("qwen3", None, ("<|im_start|>user\n", "<|im_end|>")),  # the template the package ships
    ("llama3", LLAMA3_TEMPLATE, ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")),
])
def test_the_last_user_turn_is_cut_from_a_rendered_prompt(name: str, template: str | None,
                                                          markers: tuple[str, str]) -> None:
    tok = _tokenizer(name, template)
    turns, why = turn_markers(tok)
    assert turns is not None and (turns.user_open, turns.user_close) == markers and why == ""
    assert turns.last_user(_rendered(tok, CHAT)) == "Explain it in detail,\nstep by step."
    assert turns.last_user(_rendered(tok, CHAT[1:2])) == "What is TCP?"  # the first turn, no system
    assert turns.last_user(_rendered(tok, CHAT[:1])) is None  # no user turn: the caller keeps the text


def test_tool_results_and_special_tokens_are_not_the_user_turn() -> None:
    tok = _tokenizer("qwen3")
    turns, _ = turn_markers(tok)
    assert turns is not None and turns.tool_prefix == "<tool_response>\n"
    # Qwen renders a tool result as a user turn: training's last user message is the one before
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "lookup", "arguments": {"q": "tcp"}}}]}
    chat = [*CHAT, call, {"role": "tool", "content": "TCP is RFC 793"}]
    assert turns.last_user(_rendered(tok, chat)) == "Explain it in detail,\nstep by step."
    # a multimodal prompt's placeholders, one per image patch (was: 1,000 of them, then the text)
    image = "<|vision_start|>" + "<|image_pad|>" * 1000 + "<|vision_end|>"
    assert turns.last_user(f"<|im_start|>user\n{image}Describe this photo.<|im_end|>\n<|im_start|>assistant\n") \
        == "Describe this photo."


def test_no_markers_without_a_template_or_special_tokens() -> None:
    turns, why = turn_markers(_tokenizer("llama3"))  # the package ships no template
    assert turns is None and "renders no chat template" in why
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    turns, why = turn_markers(_tokenizer("llama3", plain))  # a user could type "user: " itself
    assert turns is None and "is not marked by a special token" in why
    dropping = "{% for m in messages %}<|start_header_id|>{{ m['content'][:5] }}<|eot_id|>{% endfor %}"
    assert turn_markers(_tokenizer("llama3", dropping)) == (None, "the chat template does not render "
                                                                  "messages as written")
