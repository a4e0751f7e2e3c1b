"""Stack Exchange `medicalsciences`: `/questions` (withbody), then their answers.

Each questions page is followed by one `/questions/{ids}/answers` call; pages land as
`questions-<n>.json` and `answers-<n>.json`, and a question becomes a record with its
accepted answer, or else its top-scored one (score >= min_score). `backoff`,
`quota_remaining` and throttle errors are handled by the shared client.

params: site ("medicalsciences"), tagged (";"-separated tags), sort ("votes"), page_size (100),
max_pages (10; 0 = all), min_score (1), filter ("withbody"), plus the HTTP ones.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Iterator

from stages.sources import Key, Source, SourceError, _shape, _text, stored_json



def html_to_text(text: str) -> str:
    return _text.html_to_text(text)


class StackExchange(Source):
    kind = "stackexchange"
    licence = "CC BY-SA (per post: content_license; attribution to the Stack Exchange authors required)"
    origin = "https://medicalsciences.stackexchange.com/"
    network = True
    api = "stackexchange"
    PARAMS = {
        "site": Key(str, "medicalsciences", nonblank=True),
        "tagged": Key(str, ""),        # ";"-separated tags
        "sort": Key(str, "votes", choices=("activity", "votes", "creation", "hot", "week", "month")),
        "filter": Key(str, "withbody", nonblank=True),
        "page_size": Key(int, 100, min=1, max=100),
        "max_pages": Key(int, 10, min=0, expect="0 (all) or more"),
        "min_score": Key(int, 1),
    }

    def fetch(self, store) -> None:
        from stages import http

        site = self.param("site")
        size = min(self.param("page_size"), 100)
        max_pages = self.param("max_pages")
        query = {"site": site, "filter": self.param("filter"), "pagesize": size,
                 "order": "desc", "sort": self.param("sort"), "tagged": self.param("tagged") or None}
        state = store.checkpoint or {"page": 1, "answers_for": None, "done": False}
        # no total without filter=total: "all" is has_more; an empty page that says has_more is retried
        listing = http.Listing(self.name, state)

        def read(reply) -> http.Page:
            doc = reply.json()
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise http.Incomplete(f"\"items\" is {type(items).__name__}, not a list")
            return http.Page(len(items), state["page"] + 1 if doc.get("has_more") else None, doc.get("total"))

        with http.Client(self.name, self.api, self.params) as client:
            while True:
                if state["answers_for"]:
                    page, ids = state["answers_for"]
                    reply = client.get(f"questions/{';'.join(map(str, ids))}/answers",
                                       {"site": site, "filter": "withbody", "pagesize": 100, "order": "desc", "sort": "votes"})
                    store.put(f"answers-{page:05d}.json", reply.content)
                    state["answers_for"] = None
                    store.save_checkpoint(state)
                    continue
                if state["done"] or (max_pages and state["page"] > max_pages):
                    break
                reply = client.get("questions", {**query, "page": state["page"]}, check=listing.check(read))
                doc = reply.json()
                store.put(f"questions-{state['page']:05d}.json", reply.content)
                ids = [q["question_id"] for q in doc.get("items") or []
                       if isinstance(q, dict) and q.get("answer_count") and q.get("question_id")]
                state["answers_for"] = [state["page"], ids] if ids else None
                state["done"] = not doc.get("has_more")
                state["page"] += 1
                store.save_checkpoint(state)

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        if not page.name.startswith("questions"):
            return  # answers pages are read with their questions page
        doc = self._load(page)
        answers_page = page.with_name(page.name.replace("questions", "answers", 1))
        answers: dict[Any, list[dict]] = {}
        for a in _shape.objs(self._load(answers_page).get("items")) if answers_page.exists() else []:
            if _shape.key(a.get("question_id")) is not None:
                answers.setdefault(_shape.key(a.get("question_id")), []).append(a)
        min_score = self.param("min_score")
        for n, q in enumerate(_shape.objs(doc.get("items")), 1):
            qid = _shape.key(q.get("question_id"))
            title = _shape.text(q.get("title"))
            if qid is None or not title:
                self.skip("a question without question_id or title", f"{page} item {n}")
                continue
            candidates = answers.get(qid, []) + _shape.objs(q.get("answers"))
            best = next((a for a in candidates if a.get("is_accepted") is True), None)
            if best is None:
                top = max(candidates, key=lambda a: _shape.number(a.get("score")), default=None)
                best = top if top is not None and _shape.number(top.get("score")) >= min_score else None
            if best is None:
                continue  # no accepted or good-enough answer: not malformed, just not an example
            yield {"id": str(qid), "origin": _shape.text(q.get("link")) or f"{self.origin}questions/{qid}",
                   "title": html.unescape(title), "question": html_to_text(_shape.text(q.get("body"))),
                   "answer": html_to_text(_shape.text(best.get("body"))), "accepted": best.get("is_accepted") is True,
                   "score": _shape.number(best.get("score")), "tags": _shape.texts(q.get("tags") or []),
                   "licence": _shape.text(best.get("content_license")) or _shape.text(q.get("content_license")),
                   "author": _shape.text(_shape.obj(best.get("owner")).get("display_name"))}

    @staticmethod
    def _load(path: Path) -> dict:
        doc = stored_json(path)
        if not isinstance(doc, dict):
            raise SourceError(f"{path}: a JSON {type(doc).__name__}, not a Stack Exchange answer (an object with "
                              f"\"items\"); delete it and rerun the scrape")
        return doc

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if not record["answer"]:
            return
        question = record["title"] + (f"\n\n{record['question']}" if record["question"] else "")
        yield {"task": "stackexchange_answer", "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": record["answer"]}]}
        if record["tags"]:
            yield {"task": "stackexchange_tags", "messages": [
                {"role": "user", "content": f"Which topic tags fit this medical question?\n\n{question}"},
                {"role": "assistant", "content": ", ".join(record["tags"])}]}


SOURCE = StackExchange
