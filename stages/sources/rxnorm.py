"""RxNorm through RxNav: `drugs.json?name=` per drug name, then `rxcui/{id}/allrelated.json`.

Over-limit requests get a 403 from RxNav (handled by the shared client as "slow down").
The interaction API was discontinued in January 2024 and is not used.
Pages: `drugs-<name>.json` and `allrelated-<rxcui>.json`; the checkpoint holds the names
and rxcuis still to fetch.

params: names (list of drug names), related_per_name (how many clinical drugs (SCD) per
name get an allrelated lookup, 3), plus the HTTP ones.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from stages.sources import Key, Source, SourceError, _shape, stored_json

TTY_LABEL = {"IN": "ingredients", "PIN": "precise ingredients", "MIN": "multiple ingredients", "BN": "brand names",
             "DF": "dose forms", "SCD": "clinical drugs", "SBD": "branded drugs", "SCDF": "clinical dose forms",
             "SBDF": "branded dose forms", "GPCK": "generic packs", "BPCK": "branded packs"}


_PAGE = re.compile(r"(drugs|allrelated)-([a-z0-9-]+)\.json")  # the page names fetch gives: what was asked


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "x"


def _groups(block: Any) -> dict[str, list[dict]]:
    """tty -> the concept properties (objects) of a drugGroup / allRelatedGroup; wrong-typed parts count as absent."""
    out: dict[str, list[dict]] = {}
    for group in _shape.objs(_shape.obj(block).get("conceptGroup")):
        props = _shape.objs(group.get("conceptProperties"))
        if props:
            out.setdefault(_shape.text(group.get("tty")), []).extend(props)
    return out


def _strict_groups(doc: Any) -> None:
    """What fetch accepts from drugs.json: {"drugGroup": {"conceptGroup": [{"conceptProperties": [{...}]}]}}
    (null where RxNav leaves a part out); another shape raises ValueError, so the client retries, then fails
    in one line, instead of storing it (parse would read it as no products)."""
    group = doc.get("drugGroup") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not isinstance(group, (dict, type(None))):
        raise ValueError("drugs.json without a drugGroup object")
    for concept in (group or {}).get("conceptGroup") or []:
        if not isinstance(concept, dict) or not all(isinstance(c, dict) for c in concept.get("conceptProperties") or []):
            raise ValueError("a conceptGroup that is not a list of objects with conceptProperties objects")


class RxNorm(Source):
    kind = "rxnorm"
    licence = "RxNorm: free; UMLS licence terms apply to some source vocabularies (https://www.nlm.nih.gov/research/umls/rxnorm/docs/termsofservice.html)"
    origin = "https://rxnav.nlm.nih.gov/"
    network = True
    api = "rxnav"
    PARAMS = {
        "names": Key(list, lambda: ["lisinopril", "metformin", "atorvastatin"], items=str, nonblank=True, unique=True),
        "related_per_name": Key(int, 3, min=0),  # clinical drugs (SCD) per name
    }

    def fetch(self, store) -> None:
        from stages import http

        names = self.param("names")
        per_name = self.param("related_per_name")
        state = store.checkpoint or {"names": list(names), "rxcuis": []}
        with http.Client(self.name, self.api, self.params) as client:
            while state["names"] or state["rxcuis"]:
                if state["rxcuis"]:
                    rxcui = state["rxcuis"][0]
                    reply = client.get(f"rxcui/{rxcui}/allrelated.json")
                    store.put(f"allrelated-{rxcui}.json", reply.content)
                    state["rxcuis"].pop(0)
                else:
                    name = state["names"][0]
                    reply = client.get("drugs.json", {"name": name},  # a drugGroup of another shape is retried, not a crash
                                       check=lambda r: _strict_groups(r.json()))
                    store.put(f"drugs-{_slug(name)}.json", reply.content)
                    scd = _groups(reply.json().get("drugGroup") or {}).get("SCD", [])
                    state["rxcuis"] += [c["rxcui"] for c in scd[:per_name] if str(c.get("rxcui", "")).isdigit()]
                    state["names"].pop(0)
                store.save_checkpoint(state)

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        doc = stored_json(page)
        if not isinstance(doc, dict) or not ({"drugGroup", "allRelatedGroup"} & doc.keys()):
            raise SourceError(f"{page}: not an RxNav answer (expected drugs.json's \"drugGroup\" or allrelated.json's "
                              f"\"allRelatedGroup\"); delete it and rerun the scrape")
        # current answers may leave out what was asked (drugGroup.name null, rxcui ""): the page name has it
        asked = _PAGE.fullmatch(page.name)
        if "drugGroup" in doc:
            group = _shape.obj(doc["drugGroup"])
            query = _shape.text(group.get("name")) or (asked.group(2).replace("-", " ") if asked and asked.group(1) == "drugs" else "")
            products = [{"rxcui": _shape.text(c.get("rxcui")), "name": _shape.text(c.get("name")),
                         "synonym": _shape.text(c.get("synonym")), "tty": tty}
                        for tty, props in _groups(group).items() for c in props if _shape.text(c.get("rxcui"))]
            if products and not query:
                raise SourceError(f"{page}: drugs.json answer without drugGroup.name, and the file is not named "
                                  f"drugs-<name>.json; rename it after the drug name it was fetched for")
            if products:
                yield {"id": f"drugs:{query.lower()}", "type": "drugs", "query": query, "products": products,
                       "origin": f"https://mor.nlm.nih.gov/RxNav/search?searchBy=String&searchTerm={query}"}
        else:
            group = _shape.obj(doc["allRelatedGroup"])
            related = {tty: names for tty, props in _groups(group).items()
                       if (names := sorted(set(_shape.texts([c.get("name") for c in props]))))}
            rxcui = _shape.text(group.get("rxcui")) or (asked.group(2) if asked and asked.group(1) == "allrelated" else "")
            if related and not rxcui.isdigit():
                raise SourceError(f"{page}: allrelated.json answer without allRelatedGroup.rxcui, and the file is not "
                                  f"named allrelated-<rxcui>.json; rename it after the RxCUI it was fetched for")
            this = next((_shape.text(c.get("name")) for props in _groups(group).values() for c in props
                         if _shape.text(c.get("rxcui")) == rxcui), "")
            if related:
                yield {"id": f"allrelated:{rxcui}", "type": "allrelated", "rxcui": rxcui, "name": this, "related": related,
                       "origin": f"https://mor.nlm.nih.gov/RxNav/search?searchBy=RXCUI&searchTerm={rxcui}"}

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if record["type"] == "drugs":
            clinical = [p for p in record["products"] if p["tty"] == "SCD"]
            branded = [p for p in record["products"] if p["tty"] == "SBD"]
            if clinical:
                yield {"task": "rxnorm_products", "messages": [
                    {"role": "user", "content": f"Which clinical drug products (RxNorm SCD) exist for {record['query']}? Give their RxCUIs."},
                    {"role": "assistant", "content": "\n".join(f"- {p['name']} (RxCUI {p['rxcui']})" for p in clinical)}]}
            pairs = [p for p in branded if p["synonym"]]
            if pairs:  # one example per task and record: normalize keys examples by (record, task)
                yield {"task": "rxnorm_brand_generic", "messages": [
                    {"role": "user", "content": f"Which branded {record['query']} products are in RxNorm, and what is "
                                                f"the generic name of each?"},
                    {"role": "assistant", "content": "\n".join(f"- {p['synonym']}: {p['name']} (RxCUI {p['rxcui']})"
                                                                for p in pairs)}]}
            return
        name = record["name"] or f"RxCUI {record['rxcui']}"
        related = record["related"]
        parts = [f"{TTY_LABEL.get(tty, tty)}: {', '.join(names)}" for tty, names in related.items()
                 if tty in ("IN", "BN", "DF") and names]
        if parts:
            yield {"task": "rxnorm_related", "messages": [
                {"role": "user", "content": f"For {name}, list its ingredient, brand names and dose form in RxNorm."},
                {"role": "assistant", "content": "\n".join(parts)}]}
        if related.get("IN") and related.get("BN"):
            yield {"task": "rxnorm_brands", "messages": [
                {"role": "user", "content": f"Which brand names contain {', '.join(related['IN'])}?"},
                {"role": "assistant", "content": ", ".join(related["BN"])}]}


SOURCE = RxNorm
