"""NEWS2 (Royal College of Physicians, 2017): score ward vitals exactly by the chart.

Pure functions, no I/O: the news2 source builds its answers from `score()`, and
evaluation reads a model's answer back with `parse_answer()`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

CONSCIOUSNESS = {"A": "Alert", "C": "new Confusion", "V": "responds to Voice", "P": "responds to Pain",
                 "U": "Unresponsive"}
PARAMETERS = ("resp_rate", "spo2", "air_or_oxygen", "systolic_bp", "pulse", "consciousness", "temperature")
BANDS = ("low", "low-medium", "medium", "high")

# (points, label) per chart row, checked top to bottom with `value <= upper`; the last row catches the rest.
# Integers are whole numbers on the chart, so `<= 11` covers the row "9-11".
_RESP = ((8, 3, "≤8"), (11, 1, "9–11"), (20, 0, "12–20"), (24, 2, "21–24"), (None, 3, "≥25"))
_SPO2_SCALE1 = ((91, 3, "≤91"), (93, 2, "92–93"), (95, 1, "94–95"), (None, 0, "≥96"))
_SYSTOLIC = ((90, 3, "≤90"), (100, 2, "91–100"), (110, 1, "101–110"), (219, 0, "111–219"), (None, 3, "≥220"))
_PULSE = ((40, 3, "≤40"), (50, 1, "41–50"), (90, 0, "51–90"), (110, 1, "91–110"), (130, 2, "111–130"),
          (None, 3, "≥131"))
_TEMPERATURE = ((35.0, 3, "≤35.0"), (36.0, 1, "35.1–36.0"), (38.0, 0, "36.1–38.0"), (39.0, 1, "38.1–39.0"),
                (None, 2, "≥39.1"))

RESPONSES = {
    "zero": ("ward-based response", "minimum 12-hourly",
             "Continue routine NEWS2 monitoring."),
    "low": ("ward-based response", "minimum 4–6-hourly",
            "A registered nurse assesses the patient and decides whether increased frequency of monitoring "
            "and/or escalation of care is required."),
    "low-medium": ("urgent ward-based response", "minimum 1-hourly",
                   "A registered nurse informs the medical team caring for the patient, who reviews and decides "
                   "whether escalation of care is necessary."),
    "medium": ("urgent response (key threshold)", "minimum 1-hourly",
               "A registered nurse immediately informs the medical team caring for the patient; urgent "
               "assessment by a clinician or team with core competencies in the care of acutely ill patients; "
               "provide clinical care in an environment with monitoring facilities."),
    "high": ("emergency response", "continuous monitoring of vital signs",
             "A registered nurse immediately informs the medical team (at least specialist registrar level); "
             "emergency assessment by a team with critical-care competencies, including advanced airway "
             "management skills; consider transfer of care to a level 2 or 3 facility (HDU or ICU)."),
}


@dataclass(frozen=True)
class Vitals:
    resp_rate: int          # breaths/min
    spo2: int               # %
    spo2_scale: int         # 1, or 2 for hypercapnic respiratory failure (target 88-92%)
    on_oxygen: bool
    systolic_bp: int        # mmHg
    pulse: int              # beats/min
    consciousness: str      # A, C (new confusion), V, P or U
    temperature: float      # °C, one decimal

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Vitals":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Score:
    points: dict[str, int]     # per parameter, in PARAMETERS order
    ranges: dict[str, str]     # the chart row each parameter fell in
    aggregate: int
    single_three: bool         # a score of 3 in any one parameter
    band: str                  # low, low-medium, medium or high
    response: str
    monitoring: str
    action: str


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"NEWS2 {name} must be a whole number (got {value!r})")
    return int(value)


def _row(table, value) -> tuple[int, str]:
    for upper, points, label in table:
        if upper is None or value <= upper:
            return points, label
    raise AssertionError("chart tables end with a catch-all row")


def spo2_points(spo2: int, scale: int, on_oxygen: bool) -> tuple[int, str]:
    if scale == 1:
        return _row(_SPO2_SCALE1, spo2)
    if scale != 2:
        raise ValueError(f"NEWS2 SpO2 scale must be 1 or 2 (got {scale!r})")
    # Scale 2: low saturations score as usual; above the 88-92% target only oxygen scores.
    low = ((83, 3, "≤83"), (85, 2, "84–85"), (87, 1, "86–87"), (92, 0, "88–92"))
    for upper, points, label in low:
        if spo2 <= upper:
            return points, label
    if not on_oxygen:
        return 0, "≥93 on air"
    return _row(((94, 1, "93–94 on oxygen"), (96, 2, "95–96 on oxygen"), (None, 3, "≥97 on oxygen")), spo2)


def score(vitals: Vitals | dict[str, Any]) -> Score:
    """Per-parameter points, aggregate, clinical risk band and response for one set of observations."""
    v = Vitals.from_dict(vitals) if isinstance(vitals, dict) else vitals
    consciousness = str(v.consciousness).strip().upper()[:1]
    if consciousness not in CONSCIOUSNESS:
        raise ValueError(f"NEWS2 consciousness must be one of A, C, V, P, U (got {v.consciousness!r})")
    # the chart's temperature rows are to one decimal: 36.04 reads 36.0
    temperature = round(float(v.temperature), 1)
    rows = {
        "resp_rate": _row(_RESP, _whole("resp_rate", v.resp_rate)),
        "spo2": spo2_points(_whole("spo2", v.spo2), v.spo2_scale, bool(v.on_oxygen)),
        "air_or_oxygen": (2, "oxygen") if v.on_oxygen else (0, "air"),
        "systolic_bp": _row(_SYSTOLIC, _whole("systolic_bp", v.systolic_bp)),
        "pulse": _row(_PULSE, _whole("pulse", v.pulse)),
        "consciousness": (0, "Alert") if consciousness == "A" else (3, CONSCIOUSNESS[consciousness]),
        "temperature": _row(_TEMPERATURE, temperature),
    }
    points = {k: rows[k][0] for k in PARAMETERS}
    aggregate = sum(points.values())
    single_three = 3 in points.values()
    if aggregate >= 7:
        band, key = "high", "high"
    elif aggregate >= 5:
        band, key = "medium", "medium"
    elif single_three:
        band, key = "low-medium", "low-medium"
    else:
        band, key = "low", "zero" if aggregate == 0 else "low"
    response, monitoring, action = RESPONSES[key]
    return Score(points=points, ranges={k: rows[k][1] for k in PARAMETERS}, aggregate=aggregate,
                 single_three=single_three, band=band, response=response, monitoring=monitoring, action=action)


# --- reading an answer back (evaluation)
_AGGREGATE_RE = re.compile(r"(?:aggregate|total)(?:\s+news2)?\s+score\s*(?:is|of|=|:)?\s*(\d{1,2})\b"
                           r"|news2(?:\s+score)?\s*(?:is|of|=|:)\s*(\d{1,2})\b", re.IGNORECASE)
_BAND_RE = re.compile(r"(?:clinical\s+)?risk(?:\s+band)?\s*(?:is|:|=)?\s*(low\s*[-–—]?\s*medium|low|medium|high)\b"
                      r"|\b(low\s*[-–—]\s*medium|low|medium|high)\s+(?:clinical\s+)?risk\b", re.IGNORECASE)


def normalize_band(text: str) -> str | None:
    words = re.sub(r"[\s\-–—]+", "-", text.strip().lower())
    return words if words in BANDS else None


def parse_answer(text: str) -> tuple[int | None, str | None]:
    """(aggregate score, risk band) stated in an answer, or None for what it does not state."""
    aggregate = band = None
    match = _AGGREGATE_RE.search(text)
    if match:
        aggregate = int(match.group(1) or match.group(2))
    match = _BAND_RE.search(text)
    if match:
        band = normalize_band(match.group(1) or match.group(2))
    return aggregate, band
