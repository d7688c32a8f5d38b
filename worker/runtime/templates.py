"""Prompt families of the llava-hf LLaVA-NeXT checkpoints.

Prompts are always built by ``processor.apply_chat_template`` with the checkpoint's own template. These
templates are what a checkpoint gets when it ships none (and what the tiny checkpoints ship): each renders
exactly the prompt the llava-hf model card prints for its family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Jinja pieces shared by every family: images first, then text, as the llava-hf templates do.
_IMAGES = "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
_TEXT = "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
_ROLE_ERROR = "{{ raise_exception('Only system, user and assistant roles are supported') }}"

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHATML_SYSTEM = "Answer the questions."
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class Template:
    """A prompt family: its chat template and the special tokens its tokenizer needs."""

    name: str
    chat_template: str
    special_tokens: dict[str, str]
    extra_special_tokens: tuple[str, ...] = ()
    system_prompt: str = ""
    add_bos: bool = True  # tokenizer prepends BOS (Llama/Mistral style); False where the template writes it
    example: str = field(default="", compare=False)  # the model card's prompt for "{question}"


MISTRAL = Template(
    name="mistral",
    chat_template=(
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<<SYS>>\n' }}" + _TEXT + "{{ '\n<</SYS>>\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' }}" + _IMAGES + _TEXT + "{{ ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' }}" + _TEXT + "{{ eos_token }}"
        "{% else %}" + _ROLE_ERROR + "{% endif %}{% endfor %}"
    ),
    special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    extra_special_tokens=("[INST]", "[/INST]"),
    example="[INST] <image>\n{question} [/INST]",
)

VICUNA = Template(
    name="vicuna",
    chat_template=(
        "{% if messages[0]['role'] != 'system' %}" + VICUNA_SYSTEM + " {% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}" + _TEXT + "{{ ' ' }}"
        "{% elif message['role'] == 'user' %}{{ 'USER: ' }}" + _IMAGES + _TEXT + "{{ ' ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}" + _TEXT + "{{ eos_token }}"
        "{% else %}" + _ROLE_ERROR + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    system_prompt=VICUNA_SYSTEM,
    example=VICUNA_SYSTEM + " USER: <image>\n{question} ASSISTANT:",
)

CHATML = Template(
    name="chatml",
    chat_template=(
        "{% if messages[0]['role'] != 'system' %}"
        "<|im_start|>system\n" + CHATML_SYSTEM + "<|im_end|>{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] in ['system', 'user', 'assistant'] %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}" + _IMAGES + _TEXT + "{{ '<|im_end|>' }}"
        "{% else %}" + _ROLE_ERROR + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    special_tokens={
        "bos_token": "<|startoftext|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
    },
    extra_special_tokens=("<|im_start|>", "<|endoftext|>"),
    system_prompt=CHATML_SYSTEM,
    add_bos=False,
    example=(
        "<|im_start|>system\n" + CHATML_SYSTEM + "<|im_end|><|im_start|>user\n<image>\n{question}<|im_end|>"
        "<|im_start|>assistant\n"
    ),
)

_HEADER = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
LLAMA3 = Template(
    name="llama3",
    chat_template=(
        "{{ bos_token }}"
        "{% if messages[0]['role'] != 'system' %}"
        "<|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYSTEM + "<|eot_id|>{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] in ['system', 'user', 'assistant'] %}"
        + _HEADER
        + _IMAGES
        + _TEXT
        + "{{ '<|eot_id|>' }}"
        "{% else %}" + _ROLE_ERROR + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    special_tokens={
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
    },
    extra_special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"),
    system_prompt=LLAMA3_SYSTEM,
    add_bos=False,
    example=(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYSTEM + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\n{question}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (MISTRAL, VICUNA, CHATML, LLAMA3)}
