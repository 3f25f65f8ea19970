"""Chat templates and the assistant-only loss mask.

A template is Jinja, rendered by transformers' `apply_chat_template` exactly as at inference:
the tokenizer's own `chat_template`, or a named built-in. The mask comes from rendering the
conversation turn by turn: each rendering must extend the previous one as a string, and the
text between "prompt for assistant turn i" (add_generation_prompt) and "conversation up to
turn i" is assistant text. Each segment is tokenized on its own, so the boundaries are exact
token boundaries; a template that rewrites earlier turns (some drop old reasoning, for
example) cannot give a mask this way, and the run stops and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import TemplateError

ROLES = ("system", "user", "assistant")

# Built-ins, written from the published formats; `chat_template=tokenizer` uses the tokenizer's.
BUILTIN = {
    "llama3": (
        "{{ bos_token }}{% for m in messages %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # prompt/completion without chat markup: the completion follows the prompt, then EOS
    "plain": "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
             "{% endfor %}",
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


@dataclass
class Encoded:
    tokens: list[int]
    loss_mask: list[int]  # 1 where the token is assistant output (the loss is taken there)


class ChatFormatter:
    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        if template in BUILTIN:
            self.template = BUILTIN[template]
        elif template == "tokenizer":
            if not getattr(tokenizer, "chat_template", None):
                raise TemplateError(
                    "chat_template=tokenizer, but the tokenizer has no chat_template; name a built-in "
                    f"({', '.join(BUILTIN)}) or use a tokenizer whose tokenizer_config.json has one"
                )
            self.template = tokenizer.chat_template
        else:
            raise TemplateError(f"chat_template={template!r}: use 'tokenizer' or one of {', '.join(BUILTIN)}")
        self.name = template

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, messages: list[dict]) -> Encoded:
        """Tokens of the whole conversation and a mask that is 1 exactly on assistant turns."""
        tokens: list[int] = []
        mask: list[int] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = self._extend(done, self.render(messages[:i], add_generation_prompt=True), i)
                self._append(tokens, mask, prompt[len(done):], 0)
                done = prompt
            text = self._extend(done, self.render(messages[: i + 1]), i)
            self._append(tokens, mask, text[len(done):], int(message["role"] == "assistant"))
            done = text
        if not any(mask):
            raise TemplateError("the conversation has no assistant text to learn from")
        return Encoded(tokens, mask)

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        """What generation starts from: the conversation so far plus the assistant header."""
        return self._tokenize(self.render(messages, add_generation_prompt=True))

    def _extend(self, done: str, text: str, turn: int) -> str:
        if not text.startswith(done):
            raise TemplateError(
                f"chat_template={self.name}: rendering turn {turn} changes the text of earlier turns, "
                f"so kiln cannot tell which tokens are the assistant's; use a template that renders "
                f"turns append-only (llama3, chatml)"
            )
        return text

    def _append(self, tokens: list[int], mask: list[int], text: str, value: int) -> None:
        ids = self._tokenize(text)
        tokens += ids
        mask += [value] * len(ids)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
