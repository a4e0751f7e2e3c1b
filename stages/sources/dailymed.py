"""DailyMed v2: `spls.json` listing pages -> the SPL XML of each setid, sections by LOINC code.

Pages land as `spls-<n>.json` (listings: no records of their own) and `spl-<setid>.xml`;
the checkpoint holds the next listing page and the setids still to download.

params: drug_name (listing filter), labeler, page_size (100), max_labels (200; 0 = all),
plus the HTTP ones.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from stages.sources import Key, Source, SourceError, _text, _xml, stored_json

# LOINC section codes -> (key, question template)
SECTIONS = {
    "34067-9": ("indications", "What is {name} indicated for?"),
    "34068-7": ("dosage", "What is the dosage and administration of {name}?"),
    "34070-3": ("contraindications", "What are the contraindications of {name}?"),
    "43685-7": ("warnings", "What are the warnings and precautions for {name}?"),
    "34071-1": ("warnings", "What warnings does the label of {name} give?"),
    "34066-1": ("boxed_warning", "What does the boxed warning of {name} say?"),
    "34084-4": ("adverse_reactions", "What adverse reactions does the label of {name} list?"),
    "34073-7": ("interactions", "What drug interactions does the label of {name} list?"),
    "55106-9": ("active_ingredient", "What are the active ingredients of {name}?"),
    "55105-1": ("purpose", "What is the purpose of {name}?"),
    "50570-1": ("do_not_use", "When should {name} not be used?"),
}
_SETID = re.compile(r"^[0-9a-fA-F-]{36}$")


def _code(section) -> str | None:
    code = _xml.find(section, "code")
    return code.get("code") if code is not None else None


def _subsections(section) -> Iterator:
    for component in _xml.findall(section, "component"):
        sub = _xml.find(component, "section")
        if sub is not None:
            yield sub


def labelled_sections(root) -> Iterator:
    """The outermost sections whose LOINC code has a question, in document order, at any depth
    (an OTC boxed warning sits inside an unclassified section); each carries its subsections."""
    def walk(section):
        if _code(section) in SECTIONS:
            yield section
        else:
            for sub in _subsections(section):
                yield from walk(sub)

    body = _xml.find(root, "component", "structuredBody")
    for component in _xml.findall(body, "component"):
        section = _xml.find(component, "section")
        if section is not None:
            yield from walk(section)


def section_lines(section, top: bool = False) -> list[str]:
    """A section as text lines: its title as a heading, its narrative (lists and table rows kept), then
    every subsection the same way, at any depth. The top title loses its number (the question names
    the section); subsection numbers stay, because the label's cross-references ("see 5.1") use them."""
    title = _text.one_line(_text.xml_to_text(_xml.find(section, "title")))
    lines = [_text.strip_section_number(title) if top else title] if title else []
    body = _text.xml_to_text(_xml.find(section, "text"))
    if body:
        lines.append(body)
    for sub in _subsections(section):
        lines.extend(section_lines(sub))
    return lines


class DailyMed(Source):
    kind = "dailymed"
    licence = "public domain (US NLM DailyMed; SPL text as submitted by labelers)"
    origin = "https://dailymed.nlm.nih.gov/"
    network = True
    api = "dailymed"
    PARAMS = {
        "drug_name": Key(str, ""),     # listing filter
        "labeler": Key(str, ""),
        "page_size": Key(int, 100, min=1, max=100),
        "max_labels": Key(int, 200, min=0, expect="0 (all) or more"),
    }

    def fetch(self, store) -> None:
        from stages import http

        size = self.param("page_size")
        max_labels = self.param("max_labels")
        filters = {"drug_name": self.param("drug_name") or None, "labeler": self.param("labeler") or None}
        state = store.checkpoint or {"page": 1, "pending": [], "listed": 0, "listing_done": False}
        # "all" is the listing's metadata.total_elements (or max_labels); a repeated next_page stops the scrape
        listing = http.Listing(self.name, state, wanted=max_labels, got=state["listed"])

        def read(reply) -> http.Page:
            doc = reply.json()
            rows, meta = doc.get("data") or [], doc.get("metadata") or {}
            if not isinstance(rows, list) or not isinstance(meta, dict):
                raise http.Incomplete("\"data\" is not a list or \"metadata\" not an object")
            nxt = meta.get("next_page")
            return http.Page(len(rows), None if str(nxt) in ("null", "None", "") else nxt, meta.get("total_elements"))

        with http.Client(self.name, self.api, self.params) as client:
            while True:
                if state["pending"]:
                    setid = state["pending"][0]
                    if not _SETID.match(setid):
                        raise SourceError(f"{self.name}: DailyMed listed an invalid setid {setid!r}; rerun later")
                    reply = client.get(f"spls/{setid}.xml", expect="xml")
                    store.put(f"spl-{setid}.xml", reply.content)
                    state["pending"].pop(0)
                    store.save_checkpoint(state)
                    continue
                if state["listing_done"] or (max_labels and state["listed"] >= max_labels):
                    break
                reply = client.get("spls.json", {**filters, "page": state["page"], "pagesize": size},
                                   check=listing.check(read))
                doc = reply.json()
                store.put(f"spls-{state['page']:05d}.json", reply.content)
                setids = [d["setid"] for d in doc.get("data") or [] if isinstance(d, dict) and d.get("setid")]
                if max_labels:
                    setids = setids[: max(0, max_labels - state["listed"])]
                state["pending"] += setids
                state["listed"] += len(setids)
                state["listing_done"] = not setids or listing.last.next is None
                state["page"] += 1
                store.save_checkpoint(state)

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        if page.suffix == ".json":  # a listing page: setids only, their labels are separate pages
            doc = stored_json(page)
            if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
                raise SourceError(f"{page}: not a DailyMed spls.json listing (expected an object with a \"data\" "
                                  f"list of setids); delete it and rerun the scrape")
            return
        root = _xml.parse(page)
        if _xml.local(root.tag) != "document":
            raise SourceError(f"{page}: not an SPL document (root <{_xml.local(root.tag)}>, expected <document> of "
                              f"urn:hl7-org:v3); delete it and rerun the scrape")
        node = _xml.find(root, "setId")
        setid = node.get("root") if node is not None else None
        if not setid:
            raise SourceError(f"{page}: SPL document without <setId root=...>; delete it and rerun the scrape")
        # the product: <manufacturedProduct>, or <manufacturedMedicine> in legacy (2005-era) SPL
        product = next((e for e in root.iter() if _xml.local(e.tag) in ("manufacturedProduct", "manufacturedMedicine")
                        and _xml.find(e, "name") is not None), None)
        name = ""
        if product is not None:  # <name>TRIAMINIC<suffix>Childrens ...</suffix></name>: keep a space
            node = _xml.find(product, "name")
            name = " ".join(x for x in [(node.text or "").strip(), _xml.text(_xml.find(node, "suffix"))] if x)
        generic = ""
        if product is not None:
            generic_node = next((e for e in product.iter() if _xml.local(e.tag) == "genericMedicine"), None)
            generic = _xml.text(_xml.find(generic_node, "name")) if generic_node is not None else ""
        sections: dict[str, str] = {}
        for sec in labelled_sections(root):
            key = SECTIONS[_code(sec)][0]
            text = "\n".join(section_lines(sec, top=True))
            if text:  # a second section of the same kind (two products in one label) is added, not dropped
                sections[key] = f"{sections[key]}\n{text}" if key in sections else text
        labeler = _xml.text(_xml.find(root, "author", "assignedEntity", "representedOrganization", "name"))
        yield {"id": setid, "setid": setid, "origin": f"https://dailymed.nlm.nih.gov/dailymed/lookup.cfm?setid={setid}",
               "title": _xml.text(_xml.find(root, "title")), "label_type": (_xml.find(root, "code").get("displayName", "")
                                                                          if _xml.find(root, "code") is not None else ""),
               "name": name, "generic_name": generic, "labeler": labeler,
               "effective": (_xml.find(root, "effectiveTime").get("value", "") if _xml.find(root, "effectiveTime") is not None else ""),
               "sections": sections}

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        name = record["name"] or record["generic_name"]
        if not name:
            return
        if record["generic_name"] and record["generic_name"].lower() not in name.lower():
            name = f"{name} ({record['generic_name'].lower()})"
        questions = {key: q for key, q in SECTIONS.values()}
        for key, text in record["sections"].items():
            yield {"task": f"dailymed_{key}", "messages": [
                {"role": "user", "content": questions[key].format(name=name)},
                {"role": "assistant", "content": f"From the DailyMed label ({record['labeler'] or 'labeler not given'}): {text}"}]}


SOURCE = DailyMed
