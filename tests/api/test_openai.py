"""The OpenAI-compatible API over real sockets, through the `openai` client, on every backend: chat
completions (template, streaming deltas, usage, logprobs, n), complete /v1/completions (prompt lists,
token-id prompts, echo with prompt logprobs checked against HF transformers, n with seeds, min_tokens
and ignore_eos), and the refusals, each naming its field. gRPC Chat has the same semantics."""

from __future__ import annotations

import grpc
import httpx
import pytest
import torch

from service.api.pb import amserve_pb2 as pb
from service.config import Settings
from service.engines.lm import load_model
from service.engines.lm.tokenizer import Tokenizer
from service.triton.spec import LLM
from tests.harness import ROOT, ServerProcess

openai = pytest.importorskip("openai")

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEIGHTS = ROOT / "model_repository" / LLM.name / "1"  # what both backends serve


@pytest.fixture()
def api(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_hf_dir(WEIGHTS)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(WEIGHTS).eval()


def test_the_first_model_listed_is_the_text_model(api):
    assert api.models.list().data[0].id == MODEL


def test_chat_answers_with_the_models_template(api, tokenizer, client):
    answer = api.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant"
    assert "Paris" in choice.message.content and choice.finish_reason in ("stop", "length")
    # the prompt is the template's rendering: the same text through /v1/completions generates the same
    rendered = tokenizer.apply_chat_template(QUESTION)
    assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")
    raw = api.completions.create(model=MODEL, prompt=rendered, max_tokens=12, temperature=0)
    assert raw.choices[0].text == choice.message.content
    assert answer.usage.prompt_tokens == len(tokenizer.encode_chat(QUESTION)) == raw.usage.prompt_tokens
    assert answer.usage.completion_tokens == raw.usage.completion_tokens
    # text parts are joined as one content
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    again = client.post("/v1/chat/completions", json={"model": MODEL, "messages": parts, "max_tokens": 12,
                                                       "temperature": 0}).json()
    assert again["choices"][0]["message"]["content"] == choice.message.content


def test_chat_streams_role_then_deltas_then_finish_and_usage(api):
    plain = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0)
    chunks = list(api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs_and_n_choices(api):
    answer = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for entry in content:  # greedy: the chosen token is the most likely
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode() == entry.token
    sampled = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) > 1  # seeds 5, 6, 7
    # choice i is seed + i: choice 1 of seed 5 is choice 0 of seed 6
    single = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=1.0, seed=6)
    assert single.choices[0].message.content == texts[1]
    assert sampled.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once


def test_completions_batch_prompts_as_text_and_token_ids(api, tokenizer):
    prompts = ["The capital of France is", "One, two, three,"]
    ids = [tokenizer.encode(p) for p in prompts]
    answers = [api.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    for prompt in (prompts, ids):
        batch = api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        assert [c.index for c in batch.choices] == [0, 1]
        assert [c.text for c in batch.choices] == [a.choices[0].text for a in answers]
        assert batch.usage.prompt_tokens == sum(map(len, ids))
    one = api.completions.create(model=MODEL, prompt=ids[0], max_tokens=6, temperature=0)
    assert one.choices[0].text == answers[0].choices[0].text

    streamed = list(api.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    for index, answer in enumerate(answers):
        text = "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == index)
        assert text == answer.choices[0].text
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens == sum(
        a.usage.completion_tokens for a in answers)


@pytest.fixture(scope="module", params=["embedded", "triton"])
def fp32_api(request, tmp_path_factory):
    """A server of the default model in fp32 (`auto` serves its int4 blocks), to compare with HF."""
    server = ServerProcess(tmp_path_factory.mktemp(f"fp32-{request.param}"), backend=request.param,
                           extra_args=["--dtype", "fp32"])
    with server, openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def assert_echo_scores(api, tokenizer: Tokenizer, text: str, logits: torch.Tensor) -> None:
    """What lm-eval-harness's loglikelihood asks (max_tokens 0, echo, logprobs) answers the
    log-softmax of `logits` (T, vocab), the expected model's over the text's tokens."""
    ids = tokenizer.encode(text)
    scored = api.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    choice = scored.choices[0]
    assert choice.text == text and scored.usage.completion_tokens == 0
    assert choice.logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    expected = torch.log_softmax(logits.float(), dim=-1)
    for position in range(1, len(ids)):
        assert choice.logprobs.token_logprobs[position] == pytest.approx(
            expected[position - 1, ids[position]].item(), abs=2e-3)
        top = expected[position - 1].topk(2)
        assert list(choice.logprobs.top_logprobs[position]) == [tokenizer.decode([i]) for i in top.indices.tolist()]
    assert choice.logprobs.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]


def test_echo_scores_the_prompt_as_hf_transformers_does(fp32_api, tokenizer, hf_model):
    text = "The capital of France is Paris."
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokenizer.encode(text)])).logits[0]
    assert_echo_scores(fp32_api, tokenizer, text, logits)


def test_echo_scores_the_prompt_with_the_served_weights(api, tokenizer):
    text = "The capital of France is Paris."
    ids = tokenizer.encode(text)
    model, _ = load_model(WEIGHTS, dtype=Settings().dtype)  # int4, as both backends load it
    assert_echo_scores(api, tokenizer, text, model(torch.tensor([ids]))[0])

    # token ids echo as the text they decode to; with a continuation, the prompt's tokens come first
    both = api.completions.create(model=MODEL, prompt=ids, max_tokens=3, echo=True, logprobs=1, temperature=0)
    plain = api.completions.create(model=MODEL, prompt=text, max_tokens=3, logprobs=1, temperature=0)
    assert both.choices[0].text == text + plain.choices[0].text
    assert both.choices[0].logprobs.token_logprobs[len(ids):] == pytest.approx(
        plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    streamed = list(api.completions.create(model=MODEL, prompt=text, max_tokens=3, echo=True, temperature=0,
                                           stream=True))
    assert streamed[0].choices[0].text == text
    assert "".join(c.choices[0].text for c in streamed) == both.choices[0].text


def test_min_tokens_and_ignore_eos(api):
    short = api.chat.completions.create(model=MODEL, messages=QUESTION,
                                        max_tokens=64, temperature=0)
    assert short.choices[0].finish_reason == "stop"
    used = short.usage.completion_tokens
    held = api.chat.completions.create(model=MODEL, messages=QUESTION,
                                       max_tokens=64, temperature=0, extra_body={"min_tokens": used + 4})
    assert held.usage.completion_tokens >= used + 4
    past = api.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert past.usage.completion_tokens == 40 and past.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("path", "body", "status", "field"), [
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 422, "messages[0].role"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, 422, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 40_000}]}, 413, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 5_000}]}, 422, "messages"),
    ("/v1/chat/completions", {"messages": QUESTION, "model": "nope"}, 404, "model"),
    ("/v1/completions", {"prompt": []}, 422, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, 422, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 422, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 422, "min_tokens"),
    ("/v1/completions", {"prompt": ["x"] * 5, "n": 4}, 422, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": [1] * 5000}, 422, "prompt"),
])
def test_refusals_name_their_field(client, path, body, status, field):
    r = client.post(path, json={"model": MODEL, **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field, r.text


def test_grpc_chat_streams_what_rest_answers(api, stub):
    plain = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0, logprobs=True)
    chunks = list(stub.Chat(pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content=QUESTION[0][
        "content"])], max_tokens=10, temperature=0, logprobs=True)))
    assert chunks[0].role == "assistant"
    assert "".join(c.text for c in chunks) == plain.choices[0].message.content
    assert chunks[-2].finish_reason == plain.choices[0].finish_reason
    assert not chunks[-1].HasField("logprobs") and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.logprobs.token for c in chunks if c.HasField("logprobs")] == [
        t.token for t in plain.choices[0].logprobs.content]
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Chat(pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="tool", content="x")])))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(refused.value.trailing_metadata())["amserve-error-field"] == "messages[0].role"


def test_chat_without_a_template_is_refused_naming_messages():
    tokenizer = Tokenizer.gpt2()  # GPT-2's vocabulary has no chat template
    from service.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as refused:
        tokenizer.encode_chat(QUESTION)
    assert refused.value.field == "messages"


def test_openapi_documents_chat(client):
    document = httpx.get(f"{client.base_url}/openapi.json").json()
    route = document["paths"]["/v1/chat/completions"]["post"]
    assert set(route["responses"]) >= {"200", "400", "404", "413", "422", "429"}
    assert "text/event-stream" in route["responses"]["200"]["content"]


def test_int8_weights_serve_the_same_greedy_tokens_over_triton_as_embedded(tmp_path):
    """`--dtype int8 --kv-dtype bf16` reaches Triton's llm model (the gateway hands them to the Triton
    it starts): completions answer the embedded backend's int8 tokens and logprobs, and those are not
    the fp32 model's (scored here, in-process, on the same tokens). One prompt a request, so that each
    runs alone on both: int8 layers compute in bf16, and a prompt's logprobs then move by a few
    hundredths with the batch it shares, which the requests' arrival decides."""
    prompts = ["The capital of France is", "One, two, three,"]
    options = ["--dtype", "int8", "--kv-dtype", "bf16"]
    answers = {}
    for backend in ("embedded", "triton"):
        (tmp_path / backend).mkdir()
        with ServerProcess(tmp_path / backend, backend=backend, extra_args=options) as server, \
                openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as api:
            answers[backend] = [api.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                       logprobs=1, extra_body={"ignore_eos": True}).choices[0]
                                for prompt in prompts]
    embedded, triton = answers["embedded"], answers["triton"]
    assert [c.text for c in triton] == [c.text for c in embedded] and all(c.text for c in triton)
    for ours, theirs in zip(triton, embedded):
        assert ours.logprobs.tokens == theirs.logprobs.tokens
        assert ours.logprobs.token_logprobs == pytest.approx(theirs.logprobs.token_logprobs, abs=1e-3)

    fp32, tokenizer = load_model(WEIGHTS, dtype="fp32")
    differences = []
    for prompt, choice in zip(prompts, triton):
        ids = tokenizer.encode(prompt)
        generated = tokenizer.encode(prompt + choice.text)[len(ids):]  # the same ids: the texts re-tokenise alike
        assert [tokenizer.decode([i]) for i in generated] == choice.logprobs.tokens
        logprobs = torch.log_softmax(fp32(torch.tensor([ids + generated]))[0, len(ids) - 1:-1], dim=-1)
        expected = logprobs.gather(1, torch.tensor(generated)[:, None])[:, 0]
        differences += (expected - torch.tensor(choice.logprobs.token_logprobs)).abs().tolist()
    assert max(differences) > 1e-2  # int8 served, not fp32
