import os
import re
import subprocess
import sys

import pytest

from kvcomp.eval.haystack import HAYSTACKS, haystack_sentences
from kvcomp.eval.tasks import DEPTHS, TASKS, count_tokens, derive_seed, make_sample

FILLER_RE = re.compile(r"The grass is green\.|The sky is blue\.|The sun is yellow\.|Here we go\.|"
                       r"There and back again\.")
NEEDLE_RE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")


def test_depths_are_ruler_grid():
    assert len(DEPTHS) == 40 and DEPTHS[0] == 0 and DEPTHS[-1] == 100
    assert list(DEPTHS) == sorted(set(DEPTHS))
    assert DEPTHS[1] == 3 and DEPTHS[20] == 51  # round(100 * i / 39)


def test_derive_seed_is_stable():
    assert derive_seed(0, "vt", "noise", 1024, 3) == derive_seed(0, "vt", "noise", 1024, 3)
    assert derive_seed(0, "vt", "noise", 1024, 3) != derive_seed(0, "vt", "noise", 1024, 4)
    # independent of PYTHONHASHSEED (str hashing is randomised per process)
    code = "from kvcomp.eval.tasks import derive_seed; print(derive_seed(0, 'vt', 'prose', 8192, 1))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout.strip() for h in ("1", "2")}
    assert outs == {str(derive_seed(0, "vt", "prose", 8192, 1))}


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_per_seed(ws_tok, task, haystack):
    a = make_sample(task, ws_tok, 700, haystack=haystack, seed=11)
    b = make_sample(task, ws_tok, 700, haystack=haystack, seed=11)
    c = make_sample(task, ws_tok, 700, haystack=haystack, seed=12)
    assert a == b
    assert a.prompt != c.prompt and a.answers != c.answers
    assert a.max_new_tokens == TASKS[task]
    assert a.depth in DEPTHS and all(d in DEPTHS for d in a.depths)
    # raw prompt = user message + answer prefix; the prefix is the last thing in the prompt
    assert a.prompt == a.user + " " + a.answer_prefix and not a.chat and a.add_special_tokens
    assert a.n_prompt_tokens == count_tokens(ws_tok, a.prompt) and a.n_sentences > 0
    # no answer string appears in the fixed text or the haystack (only through needles)
    for ans in a.answers:
        assert ans.lower() not in " ".join(haystack_sentences(haystack)).lower()


def _context_before(prompt, needle):
    i = prompt.index(needle)
    return prompt[:i]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_niah_single_needle_once_at_depth(ws_tok, seed):
    s = make_sample("niah_single", ws_tok, 900, haystack="noise", seed=seed)
    (needle,) = s.needles
    key, value = NEEDLE_RE.fullmatch(needle).groups()
    assert s.answers == [value] and s.query == key
    assert s.prompt.count(needle) == 1 and s.prompt.count(value) == 1
    assert len(NEEDLE_RE.findall(s.prompt)) == 1
    # the needle sits after exactly int(n * depth / 100) haystack sentences
    assert len(FILLER_RE.findall(_context_before(s.prompt, needle))) == int(s.n_sentences * s.depth / 100)
    assert s.prompt.startswith("A special magic number is hidden within the following text.")
    assert s.answer_prefix == f"The special magic number for {key} mentioned in the provided text is"
    assert f"What is the special magic number for {key} mentioned in the provided text?" in s.user


def test_passkey_needle(ws_tok):
    s = make_sample("passkey", ws_tok, 500, haystack="noise", seed=4)
    (key,) = s.answers
    assert re.fullmatch(r"\d{5}", key)
    assert s.needles == (f"The pass key is {key}. Remember it. {key} is the pass key.",)
    assert s.prompt.count(s.needles[0]) == 1 and s.prompt.count(key) == 2
    assert s.prompt.endswith("What is the pass key? The pass key is")


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_niah_multikey_distractors(ws_tok, haystack):
    for seed in range(5):
        s = make_sample("niah_multikey", ws_tok, 1200, haystack=haystack, seed=seed)
        found = NEEDLE_RE.findall(s.prompt)
        assert len(found) == 4 == len(s.needles)
        keys = [k for k, _ in found]
        assert len(set(keys)) == 4 and s.query in keys
        (answer,) = s.answers
        assert dict(found)[s.query] == answer
        assert [v for k, v in found if k != s.query and answer in v] == []  # distractors lack it
        assert s.prompt.count(answer) == 1
        # the asked needle is at s.depth; depths are distinct
        assert len(set(s.depths)) == 4
        assert s.depths[s.needles.index(f"One of the special magic numbers for {s.query} is: {answer}.")] == s.depth
    s = make_sample("niah_multikey", ws_tok, 1200, seed=0, num_distractors=1)
    assert len(s.needles) == 2


def test_niah_multivalue_and_multiquery(ws_tok):
    s = make_sample("niah_multivalue", ws_tok, 1500, haystack="prose", seed=3)
    found = NEEDLE_RE.findall(s.prompt)
    assert len(found) == 4 and {k for k, _ in found} == {s.query}
    assert sorted(v for _, v in found) == sorted(s.answers) and len(set(s.answers)) == 4
    assert all(s.prompt.count(v) == 1 for v in s.answers)
    assert s.max_new_tokens == 48
    assert s.answer_prefix == f"The special magic numbers for {s.query} mentioned in the provided text are"

    q = make_sample("niah_multiquery", ws_tok, 1500, haystack="noise", seed=3)
    found = dict(NEEDLE_RE.findall(q.prompt))
    keys = re.fullmatch(r"([a-z-]+), ([a-z-]+), ([a-z-]+), and ([a-z-]+)", q.query).groups()
    assert set(keys) == set(found) and len(set(keys)) == 4
    assert q.answers == [found[k] for k in keys]  # answers in the asked order
    assert all(q.prompt.count(v) == 1 for v in q.answers)


def _resolve_vt(prompt):
    """Follow the VAR statements in reading order; return {name: value}."""
    env = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", prompt):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
    return env


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("seed", [0, 5])
def test_vt_chain(ws_tok, haystack, seed):
    s = make_sample("vt", ws_tok, 800, haystack=haystack, seed=seed)
    env = _resolve_vt(s.prompt)  # raises KeyError if a hop came before its source
    value = s.query
    assert re.fullmatch(r"\d{5}", value)
    holders = sorted(k for k, v in env.items() if v == value)
    assert holders == sorted(s.answers) and len(s.answers) == 5
    assert list(s.depths) == sorted(s.depths) and s.depth == s.depths[0]
    assert f"5 variables are assigned the value {value}, they are:" in s.answer_prefix
    assert all(s.prompt.count(f"VAR {n} =") == 1 for n in s.answers)
    # RULER's one-shot example comes first: a solved chain with other names and another value
    demo_names = [n for n in env if n not in s.answers]
    assert len(demo_names) == 5 and len({env[n] for n in demo_names}) == 1 and env[demo_names[0]] != value
    demo, rest = s.prompt.split("they are: ", 1)[0], s.prompt.split("they are: ", 1)[1]
    assert all(n in rest.split("\n")[0] for n in demo_names) and s.answers[0] not in demo
    assert s.prompt.count("Memorize and track") == 2
    plain = make_sample("vt", ws_tok, 800, haystack=haystack, seed=seed, icl=False)
    assert plain.prompt.count("Memorize and track") == 1 and len(_resolve_vt(plain.prompt)) == 5
    two = make_sample("vt", ws_tok, 800, haystack=haystack, seed=seed, num_chains=2, num_hops=2, icl=False)
    env = _resolve_vt(two.prompt)
    assert len(env) == 6 and len(set(env.values())) == 2
    assert sorted(k for k, v in env.items() if v == two.query) == sorted(two.answers)
    assert len(two.answers) == 3


@pytest.mark.parametrize("task", ["passkey", "niah_multivalue", "vt"])
@pytest.mark.parametrize("ctx", [300, 513, 2048])
def test_length_control_stub(ws_tok, task, ctx):
    for haystack, tol in (("noise", 5), ("prose", max(len(x.split()) for x in haystack_sentences("prose")) + 8)):
        s = make_sample(task, ws_tok, ctx, haystack=haystack, seed=1)
        used = s.n_prompt_tokens + s.max_new_tokens
        assert used <= ctx and ctx - used < tol, (haystack, used)
        # one more sentence would not fit (maximality of the haystack)
        if haystack == "noise":
            assert ctx - used < 5


def test_chat_prompt(ws_tok):
    s = make_sample("niah_single", ws_tok, 600, seed=2, chat=True)
    assert s.chat and not s.add_special_tokens
    assert s.prompt == ws_tok.apply_chat_template([{"role": "user", "content": s.user}]) + s.answer_prefix
    assert s.n_prompt_tokens == count_tokens(ws_tok, s.prompt, add_special_tokens=False)
    assert s.n_prompt_tokens + s.max_new_tokens <= 600


def test_bad_inputs(ws_tok):
    with pytest.raises(ValueError, match="task"):
        make_sample("cwe", ws_tok, 500)
    with pytest.raises(ValueError, match="haystack"):
        make_sample("vt", ws_tok, 500, haystack="essay")
    with pytest.raises(ValueError, match="context_len"):
        make_sample("vt", ws_tok, 60)
    with pytest.raises(ValueError, match="context_len"):
        make_sample("vt", ws_tok, 0)
    with pytest.raises(ValueError, match="num_values"):
        make_sample("niah_multivalue", ws_tok, 500, num_values=0)
    with pytest.raises(ValueError, match="unknown option"):
        make_sample("niah_single", ws_tok, 500, num_values=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_sample("niah_single", ws_tok, 500, max_new_tokens=0)
    with pytest.raises(ValueError, match="chat_template"):
        make_sample("niah_single", object(), 500, chat=True)


@pytest.mark.parametrize("ctx", [1024, 4096])
def test_length_control_smollm2(smol_tok, ctx):
    """Real tokenizer: the prompt re-tokenizes to the recorded length and fills the budget to
    within one haystack sentence."""
    for task, haystack, chat, tol in (("niah_single", "noise", False, 8), ("vt", "prose", True, 160),
                                      ("niah_multiquery", "prose", False, 160)):
        s = make_sample(task, smol_tok, ctx, haystack=haystack, seed=7, chat=chat)
        ids = smol_tok(s.prompt, add_special_tokens=s.add_special_tokens)["input_ids"]
        assert len(ids) == s.n_prompt_tokens
        used = len(ids) + s.max_new_tokens
        assert used <= ctx and ctx - used < tol, (task, used)
        if chat:
            assert s.prompt.startswith("<|im_start|>") and s.prompt.endswith(s.answer_prefix)
