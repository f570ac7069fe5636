"""Answers from an OpenAI-compatible chat endpoint, for the paper's stage 2 (§3.1: GPT-4o rewrites weak answers).

Requests run `concurrency` at a time and are retried with exponential backoff on rate limits, server errors and
network failures. Every answer is saved on disk under the hash of its request, so a rerun never pays twice for it.
Standard library only: urllib and a thread pool.
"""

import base64
import hashlib
import json
import mimetypes
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class RegenerationError(RuntimeError):
    pass


def chat_messages(prompt: list[dict], images: list[str]) -> list[dict]:
    """Our prompt as OpenAI chat messages; the images (files) go first in the first user turn, as data URLs."""
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if images:
        first_user = next(m for m in messages if m["role"] == "user")
        parts = []
        for image in images:
            kind = mimetypes.guess_type(image)[0] or "image/png"
            data = base64.b64encode(Path(image).read_bytes()).decode()
            parts.append({"type": "image_url", "image_url": {"url": f"data:{kind};base64,{data}"}})
        first_user["content"] = parts + [{"type": "text", "text": first_user["content"]}]
    return messages


class ChatClient:
    """POSTs {base_url}/chat/completions; `complete_all` answers many conversations concurrently."""

    def __init__(self, base_url: str, model: str, api_key: str | None, cache_dir: str | Path, concurrency: int = 8,
                 retries: int = 4, timeout: float = 120.0, max_tokens: int = 2048, temperature: float = 0.0,
                 backoff: float = 2.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.cache_dir = model, api_key, Path(cache_dir)
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.parameters = {"max_tokens": max_tokens, "temperature": temperature}

    def _cache_path(self, body: dict) -> Path:
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                break
            except urllib.error.HTTPError as error:
                if error.code not in RETRY_STATUS or attempt == self.retries:
                    raise RegenerationError(f"{self.url}: HTTP {error.code}: {error.read()[:300]!r}") from error
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == self.retries:
                    raise RegenerationError(f"{self.url}: {error} after {self.retries + 1} attempts") from error
            time.sleep(self.backoff * 2 ** attempt)
        try:
            answer = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise RegenerationError(f"{self.url}: not a chat completion: {payload[:300]!r}") from error
        if not isinstance(answer, str) or not answer.strip():
            raise RegenerationError(f"{self.url}: the answer is empty")
        return answer.strip()

    def complete(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages, **self.parameters}
        cached = self._cache_path(body)
        if cached.exists():
            return json.loads(cached.read_text())["answer"]
        answer = self._post(body)
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")  # a crash never leaves half an entry
        partial.write_text(json.dumps({"model": self.model, "answer": answer}))
        os.replace(partial, cached)
        return answer

    def complete_all(self, conversations: list[list[dict]]) -> list[str | RegenerationError]:
        """One answer per conversation, in order; a request that failed every retry comes back as its error."""
        def complete_or_error(messages):
            try:
                return self.complete(messages)
            except RegenerationError as error:
                return error

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(complete_or_error, conversations), total=len(conversations),
                             desc="Regenerating chosen answers", disable=not conversations))
