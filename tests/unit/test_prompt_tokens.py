"""Prompt tokens at submit come from `tokenizers` + jinja2, and match transformers' counts
(what the engine sees) for plain prompts and chat messages; the API process loads no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from producer.prompt_tokens import load_prompt_tokenizer
from tests.conftest import MODEL_CACHE_DIR

PROMPTS = ["Hello there", "", "  spaces  and\nnewlines\t", "日本語のテキスト 🎉", "x " * 300,
           "<|im_start|>user\nhi<|im_end|>"]
CHATS = [[{"role": "user", "content": "hi"}],
         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"},
          {"role": "assistant", "content": "y"}, {"role": "user", "content": "z 🎉"}]]


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    cache = Path(MODEL_CACHE_DIR)
    return (AutoTokenizer.from_pretrained(cache / "smollm2-135m"),
            load_prompt_tokenizer("smollm2-135m", cache))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_counts_match_transformers(tokenizers, prompt):
    reference, ours = tokenizers
    assert ours.count(prompt) == len(reference.encode(prompt))


@pytest.mark.parametrize("messages", CHATS)
def test_chat_counts_match_transformers_chat_template(tokenizers, messages):
    reference, ours = tokenizers
    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.count_chat(messages) == len(reference.encode(text, add_special_tokens=False))


def test_the_api_process_submits_without_loading_torch(tmp_path, redis_url):
    script = f"""
import sys
from pathlib import Path
from genq import db
from genq.settings import Settings
from results_api.app import create_app
from tests.conftest import make_key
url = "sqlite:///{tmp_path}/genq.db"
db.upgrade(url)
settings = Settings(database_url=url, data_dir=Path("{tmp_path}"), model="dummy:tiny-llama",
                    model_cache_dir=Path("{MODEL_CACHE_DIR}"), broker_url="{redis_url}")
client = create_app({{"GENQ_SETTINGS": settings}}).test_client()
auth = {{"Authorization": "Bearer " + make_key(url)}}
for body in ({{"prompt": "hi"}}, {{"messages": [{{"role": "user", "content": "hi"}}]}}):
    assert client.post("/v1/jobs", json=body, headers=auth).status_code == 202
print(sorted({{"torch", "transformers"}} & set(sys.modules)))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_first_submits_racing_on_an_unconverted_tokenizer_all_get_it(tmp_path):
    # The API's warm-up thread and its first requests each converted the tokenizer, importing
    # transformers at once from several threads; one saw a half-imported module ("cannot
    # import name 'GGUF_CONFIG_ARCHS'") and its submit was a 500. A fresh process, a fresh
    # cache: what an API's first moments after install look like.
    script = f"""
import threading
from pathlib import Path
from producer.prompt_tokens import load_prompt_tokenizer
barrier, errors = threading.Barrier(6), []
def first_submit():
    barrier.wait()
    try:
        assert load_prompt_tokenizer("smollm2-135m", Path("{tmp_path}")).count("hi") == 1
    except Exception as error:
        errors.append(repr(error))
threads = [threading.Thread(target=first_submit) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(errors)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
