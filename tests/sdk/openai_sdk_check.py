"""Black-box check with the official OpenAI Python SDK against the offline
demo (`proxy.example.yaml` on the built-in mock): what a user of sluice
runs first. Started by .ci/run after `cargo test`; needs `pip install openai`.

Usage: python3 tests/sdk/openai_sdk_check.py path/to/sluice
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import openai
from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    binary = sys.argv[1]
    port, admin = free_port(), free_port()
    env = dict(os.environ, SLUICE_LISTEN=f"127.0.0.1:{port}", SLUICE_ADMIN_LISTEN=f"127.0.0.1:{admin}")
    proc = subprocess.Popen(
        [binary, "run", "--config", "proxy.example.yaml"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                print("sluice did not become ready:", proc.stderr.read().decode() if proc.stderr else "")
                return 1
            time.sleep(0.05)

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-sluice-demo", max_retries=0)
        messages = [{"role": "user", "content": "Say hello"}]

        reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert reply.object == "chat.completion", reply
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content.startswith("Hello from the sluice mock"), reply
        assert reply.usage.prompt_tokens == 5 and reply.usage.total_tokens == 14, reply.usage

        # The demo route caches: the same question again is a hit, and the
        # SDK reads the replay like the original.
        again = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
        assert again.headers.get("x-sluice-cache") == "HIT", dict(again.headers)
        assert again.parse().choices[0].message.content == reply.choices[0].message.content

        for expected in ("MISS", "HIT"):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True}
            )
            assert raw.headers.get("x-sluice-cache") == expected, (expected, dict(raw.headers))
            text = ""
            usage = None
            for chunk in raw.parse():
                if chunk.usage:
                    usage = chunk.usage
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            assert text == reply.choices[0].message.content, (expected, text)
            assert usage is not None and usage.completion_tokens == 9, (expected, usage)

        # The demo route validates: the SDK surfaces sluice's 400 with the
        # field to blame, and nothing reaches the mock.
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "robot", "content": "hi"}])
            raise AssertionError("a malformed request was accepted")
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.code == "invalid_request", e
            assert e.param == "messages[0].role", e.param

        models = [m.id for m in client.models.list()]
        assert "gpt-4o-mini" in models, models
        assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
        try:
            client.models.retrieve("no-such-model")
            raise AssertionError("an unknown model was found")
        except openai.NotFoundError as e:
            assert e.status_code == 404 and e.code == "model_not_found", e

        # The responses API and legacy completions, JSON and streamed.
        resp = client.responses.create(model="gpt-4o-mini", input="Say hello", instructions="Be brief.")
        assert resp.status == "completed", resp
        assert resp.output_text.startswith("Hello from the sluice mock"), resp
        assert resp.usage.input_tokens == 4 and resp.usage.output_tokens == 9, resp.usage
        streamed, final = "", None
        for event in client.responses.create(model="gpt-4o-mini", input="Say hello again", stream=True):
            if event.type == "response.output_text.delta":
                streamed += event.delta
            elif event.type == "response.completed":
                final = event.response
        assert final is not None and final.output_text == streamed, (streamed, final)
        assert final.usage.output_tokens == len(streamed.split()), final.usage
        comp = client.completions.create(model="gpt-4o-mini", prompt="Say hello")
        assert comp.choices[0].text.startswith("Hello from the sluice mock"), comp
        assert comp.usage.prompt_tokens == 2, comp.usage

        bad = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
        try:
            bad.models.list()
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError as e:
            assert e.status_code == 401 and e.code == "invalid_api_key", e

        print(
            "openai SDK check ok: chat, cache hit, stream with usage and its replay, 400 with param, "
            "responses (JSON and stream), completions, models (list and retrieve), 401"
        )
        return 0
    finally:
        proc.terminate()
        proc.wait(timeout=35)


if __name__ == "__main__":
    sys.exit(main())
