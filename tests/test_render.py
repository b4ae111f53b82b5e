"""One rendering for training and serving, over each family's special-token and chat-template conventions.

The fixture tokenizers are made here (a small byte-level BPE, no download) and dressed as each family ships
its tokenizer: BOS added by the tokenizer or not at all, written by the template or not, EOS as end of text
or end of turn, no pad token, templates that refuse a system turn or mark the assistant's tokens.
"""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers
from transformers import PreTrainedTokenizerFast

from offsite import render
from offsite.errors import ConfigError, DataError
from offsite.textdata import Example

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN2 = ("{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
         + CHATML)
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}"
          "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA2 = ("{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }}[INST] {{ m.content }} [/INST]"
          "{% elif m.role == 'system' %}<<SYS>>\n{{ m.content }}\n<</SYS>>\n\n"
          "{% else %} {{ m.content }} {{ eos_token }}{% endif %}{% endfor %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}"
           "{{ raise_exception('System role not supported') }}{% elif m.role == 'user' %}[INST] {{ m.content }} [/INST]"
           "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3 = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")
MARKED = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
          "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# family: (bos, tokenizer adds bos, eos, pad, template, the special tokens its vocabulary holds)
FAMILIES = {
    "llama2": ("<s>", True, "</s>", None, LLAMA2, ()),
    "llama3": ("<|begin_of_text|>", True, "<|eot_id|>", None, LLAMA3, ("<|start_header_id|>", "<|end_header_id|>")),
    "mistral": ("<s>", True, "</s>", None, MISTRAL, ()),
    "qwen2": (None, False, "<|im_end|>", "<|endoftext|>", QWEN2, ("<|im_start|>",)),
    "gemma2": ("<bos>", True, "<eos>", "<pad>", GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "phi3": ("<s>", True, "<|endoftext|>", None, PHI3, ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>")),
    "smollm": ("<|im_start|>", False, "<|im_end|>", "<|im_end|>", CHATML, ()),
    "gpt2": ("<|endoftext|>", False, "<|endoftext|>", None, None, ()),
    "opt": ("</s>", True, "</s>", "<pad>", None, ()),
    "marked": (None, False, "<|im_end|>", None, MARKED, ("<|im_start|>",)),
}
CHAT = Example("Fine, thanks.", messages=(("system", "Be brief."), ("user", "How are you?"), ("assistant", "Fine, thanks.")))
NO_SYSTEM = Example("Fine, thanks.", messages=CHAT.messages[1:])
PAIR = Example(" Paris", "The capital of France is")
TEXT = Example("A plain text to learn from.")


@pytest.fixture(scope="module")
def bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["How are you? Fine, thanks. Be brief.", "The capital of France is Paris.", "A plain text to learn from."]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def dressed(bpe: str, family: str) -> PreTrainedTokenizerFast:
    bos, adds_bos, eos, pad, template, extra = FAMILIES[family]
    tok = Tokenizer.from_str(bpe)
    specials = [t for t in dict.fromkeys((bos, eos, pad, *extra)) if t]
    tok.add_special_tokens(specials)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    out.chat_template = template
    return out


@pytest.fixture(params=sorted(FAMILIES))
def family(request, bpe):
    return request.param, dressed(bpe, request.param)


def _count(ids, token_id):
    return sum(1 for i in ids if i == token_id)


def test_text_gets_the_tokenizers_own_bos_and_one_eos(family):
    name, tok = family
    r = render.render(tok, TEXT)
    assert all(r.learned)
    assert r.ids[-1] == tok.eos_token_id and r.ids[-2] != tok.eos_token_id
    bos, adds_bos = FAMILIES[name][0], FAMILIES[name][1]
    assert (r.ids[0] == tok.bos_token_id) == adds_bos
    if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id:
        assert _count(r.ids, tok.bos_token_id) == int(adds_bos)


def test_a_completion_is_learned_after_the_prompt_the_server_sends(family):
    _, tok = family
    r = render.render(tok, PAIR)
    served = render.prompt_ids(tok, PAIR.prompt)
    assert r.ids[:len(served)] == served                       # the served prompt is the training prefix
    completion = tok(PAIR.completion, add_special_tokens=False)["input_ids"]
    assert r.ids == served + completion + [tok.eos_token_id]   # the documented prompt + completion + EOS
    assert r.learned == [False] * len(served) + [True] * (len(completion) + 1)
    assert served == tok(PAIR.prompt).input_ids                # what a plain HF call of the prompt gives


def test_a_chat_is_exactly_what_the_template_renders(family):
    name, tok = family
    if not FAMILIES[name][4]:
        with pytest.raises(DataError, match="chat examples need a chat template"):
            render.render(tok, CHAT)
        return
    example = NO_SYSTEM if name in ("mistral", "gemma2") else CHAT
    messages = [{"role": r, "content": c} for r, c in example.messages]
    r = render.render(tok, example)
    assert r.ids == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id:
        assert r.ids[:2] != [tok.bos_token_id] * 2, "a doubled BOS"
    ends = [tok.eos_token_id] * 2
    assert all(r.ids[i:i + 2] != ends for i in range(len(r.ids) - 1)), "a doubled end token"
    served = render.chat_prompt_ids(tok, messages[:-1])
    assert r.ids[:len(served)] == served
    learned = tok.decode([i for i, keep in zip(r.ids, r.learned) if keep], skip_special_tokens=True)
    assert learned.strip() == "Fine, thanks." and not any(r.learned[:len(served)])


def test_templates_that_refuse_a_system_turn_are_named(bpe):
    for name in ("mistral", "gemma2"):
        with pytest.raises(DataError, match="the chat template refuses this conversation.*System role not supported"):
            render.render(dressed(bpe, name), CHAT)


def test_the_templates_assistant_mask_is_used_where_it_marks_one(bpe):
    tok = dressed(bpe, "marked")
    two_turns = Example("Fine.", messages=(("user", "Hi"), ("assistant", "Hello."), ("user", "How are you?"), ("assistant", "Fine.")))
    r = render.render(tok, two_turns)
    learned = tok.decode([i for i, keep in zip(r.ids, r.learned) if keep])
    assert learned == "Hello.<|im_end|>Fine.<|im_end|>"     # both assistant turns, their end of turn included


def test_no_eos_is_a_config_error_and_no_pad_falls_back_to_eos(bpe):
    tok = dressed(bpe, "llama3")
    assert render.pad_id(tok) == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(ConfigError, match="has no EOS token"):
        render.render(tok, TEXT)
