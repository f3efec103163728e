"""The OpenAI-compatible server with ``--hf-overrides '{"vtoolkit": ...}'`` (vLLM environment): one chat request
with an image on 127.0.0.1; the usage field counts the pruned prompt. The server is stopped in any case."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

K = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_openai_server_prunes_the_prompt(fixtures, tmp_path):
    from transformers import AutoTokenizer

    model = fixtures / "qwen2_vl"
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--limit-mm-per-prompt", '{"image": 1, "video": 0}', "--max-num-seqs", "2",
           "--hf-overrides", json.dumps({"vtoolkit": {"method": "fastervlm", "keep_tokens": K}})]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "server did not start in 300 s"
            time.sleep(2)
        png = base64.b64encode((fixtures / "image0.png").read_bytes()).decode()
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
            {"type": "text", "text": "Is there a dog?"}]}]
        out = _post(f"http://127.0.0.1:{port}/v1/chat/completions",
                    {"model": str(model), "messages": messages, "max_tokens": 3, "temperature": 0})
        tok = AutoTokenizer.from_pretrained(model)
        text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "Is there a dog?"}]}],
                                       add_generation_prompt=True, tokenize=False)
        one_pad = len(tok(text)["input_ids"])                 # the prompt with a single <|image_pad|>
        n_image = 24                                          # image0 (168 x 112) on the tiny Qwen2-VL: 6 x 4
        assert out["usage"]["prompt_tokens"] == one_pad - 1 + K, (out["usage"], one_pad)
        assert out["usage"]["prompt_tokens"] != one_pad - 1 + n_image
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
