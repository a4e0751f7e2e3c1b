"""NEWS2 scoring against hand-worked chart cases (RCP 2017), and the news2 source end to end."""
from __future__ import annotations

from collections import Counter

import pytest

from stages.sources.news2 import Vitals, parse_answer, score
from stages.scrape import RawStore
from stages.sources import make

NORMAL = dict(resp_rate=16, spo2=97, spo2_scale=1, on_oxygen=False, systolic_bp=120, pulse=70,
              consciousness="A", temperature=37.0)


def vitals(**changes) -> Vitals:
    return Vitals(**{**NORMAL, **changes})


# --- every chart row boundary, one parameter at a time (values read off the chart by hand)
@pytest.mark.parametrize("value, points", [(5, 3), (8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2),
                                           (25, 3), (40, 3)])
def test_respiration_rate_rows(value, points):
    assert score(vitals(resp_rate=value)).points["resp_rate"] == points


@pytest.mark.parametrize("value, points", [(85, 3), (91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (100, 0)])
def test_spo2_scale1_rows(value, points):
    assert score(vitals(spo2=value)).points["spo2"] == points
    # on scale 1 oxygen scores only as "air or oxygen", never through SpO2
    assert score(vitals(spo2=value, on_oxygen=True)).points["spo2"] == points


@pytest.mark.parametrize("value, on_oxygen, points", [
    (80, False, 3), (83, False, 3), (84, False, 2), (85, True, 2), (86, False, 1), (87, True, 1),
    (88, False, 0), (92, False, 0), (88, True, 0), (92, True, 0),
    (93, False, 0), (97, False, 0), (100, False, 0),          # above target on air: 0
    (93, True, 1), (94, True, 1), (95, True, 2), (96, True, 2), (97, True, 3), (100, True, 3),  # on oxygen
])
def test_spo2_scale2_rows(value, on_oxygen, points):
    assert score(vitals(spo2=value, spo2_scale=2, on_oxygen=on_oxygen)).points["spo2"] == points


def test_air_or_oxygen():
    assert score(vitals(on_oxygen=False)).points["air_or_oxygen"] == 0
    assert score(vitals(on_oxygen=True)).points["air_or_oxygen"] == 2


@pytest.mark.parametrize("value, points", [(70, 3), (90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0),
                                           (219, 0), (220, 3)])
def test_systolic_rows(value, points):
    assert score(vitals(systolic_bp=value)).points["systolic_bp"] == points


@pytest.mark.parametrize("value, points", [(35, 3), (40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1),
                                           (111, 2), (130, 2), (131, 3)])
def test_pulse_rows(value, points):
    assert score(vitals(pulse=value)).points["pulse"] == points


@pytest.mark.parametrize("value, points", [("A", 0), ("C", 3), ("V", 3), ("P", 3), ("U", 3)])
def test_consciousness(value, points):
    assert score(vitals(consciousness=value)).points["consciousness"] == points


@pytest.mark.parametrize("value, points", [(34.0, 3), (35.0, 3), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0),
                                           (38.1, 1), (39.0, 1), (39.1, 2), (40.5, 2)])
def test_temperature_rows(value, points):
    assert score(vitals(temperature=value)).points["temperature"] == points


# --- whole charts, worked by hand: aggregate, band, response, monitoring
def test_all_normal_is_zero_low_twelve_hourly():
    result = score(vitals())
    assert (result.aggregate, result.band, result.single_three) == (0, "low", False)
    assert result.monitoring == "minimum 12-hourly"


def test_aggregate_one_to_four_is_low_four_to_six_hourly():
    # RR 22 -> 2, SpO2 95 -> 1, temp 38.5 -> 1: 4
    result = score(vitals(resp_rate=22, spo2=95, temperature=38.5))
    assert (result.aggregate, result.band) == (4, "low")
    assert result.monitoring == "minimum 4–6-hourly"
    assert "registered nurse" in result.action


def test_single_three_is_low_medium_urgent_ward_response():
    result = score(vitals(consciousness="C"))  # new confusion alone: 3
    assert (result.aggregate, result.band, result.single_three) == (3, "low-medium", True)
    assert result.response == "urgent ward-based response"
    assert result.monitoring == "minimum 1-hourly"
    # pulse 135 -> 3, temp 38.4 -> 1: 4 with a single 3 is still low-medium
    assert score(vitals(pulse=135, temperature=38.4)).band == "low-medium"


def test_five_is_medium_with_or_without_a_three():
    # RR 21 -> 2, on oxygen -> 2, temp 38.2 -> 1: 5, no single 3
    result = score(vitals(resp_rate=21, on_oxygen=True, temperature=38.2))
    assert (result.aggregate, result.band, result.single_three) == (5, "medium", False)
    assert result.monitoring == "minimum 1-hourly" and "urgent" in result.response
    # SpO2 91 -> 3, RR 21 -> 2: 5; the 5-6 band outranks "3 in one parameter"
    result = score(vitals(spo2=91, resp_rate=21))
    assert (result.aggregate, result.band, result.single_three) == (5, "medium", True)


def test_six_is_medium():
    # BP 95 -> 2, pulse 115 -> 2, RR 23 -> 2: 6
    assert score(vitals(systolic_bp=95, pulse=115, resp_rate=23)).aggregate == 6
    assert score(vitals(systolic_bp=95, pulse=115, resp_rate=23)).band == "medium"


def test_seven_is_high_emergency_continuous():
    # on oxygen 2 + SpO2 93 (scale 1) 2 + RR 21 2 + temp 38.1 1 = 7
    result = score(vitals(on_oxygen=True, spo2=93, resp_rate=21, temperature=38.1))
    assert (result.aggregate, result.band) == (7, "high")
    assert result.response == "emergency response"
    assert "continuous" in result.monitoring
    assert "level 2 or 3" in result.action


def test_septic_patient_hand_worked():
    # RR 26 (3), SpO2 93 scale 1 on air (2), BP 88 (3), HR 124 (2), confused (3), 39.4 (2) = 15
    result = score(vitals(resp_rate=26, spo2=93, systolic_bp=88, pulse=124, consciousness="C", temperature=39.4))
    assert result.points == {"resp_rate": 3, "spo2": 2, "air_or_oxygen": 0, "systolic_bp": 3, "pulse": 2,
                             "consciousness": 3, "temperature": 2}
    assert (result.aggregate, result.band) == (15, "high")


def test_copd_patient_on_scale2_oxygen_vs_air():
    # Scale 2 at target on oxygen: only the oxygen scores (2): low
    assert (score(vitals(spo2=90, spo2_scale=2, on_oxygen=True)).aggregate, "low") == (2, "low")
    # 95% on oxygen on scale 2: 2 + 2 = 4, still low
    assert score(vitals(spo2=95, spo2_scale=2, on_oxygen=True)).aggregate == 4
    # 97% on oxygen on scale 2 scores 3 (+2 oxygen) = 5: medium; on scale 1 the same is only 2
    assert score(vitals(spo2=97, spo2_scale=2, on_oxygen=True)).band == "medium"
    assert score(vitals(spo2=97, spo2_scale=1, on_oxygen=True)).aggregate == 2
    # 97% on air on scale 2: 0
    assert score(vitals(spo2=97, spo2_scale=2, on_oxygen=False)).aggregate == 0
    # 84% on scale 2 scores 2, where scale 1 scores 3
    assert score(vitals(spo2=84, spo2_scale=2)).points["spo2"] == 2
    assert score(vitals(spo2=84, spo2_scale=1)).points["spo2"] == 3


def test_bad_input_is_rejected():
    with pytest.raises(ValueError):
        score(vitals(spo2_scale=3))
    with pytest.raises(ValueError):
        score(vitals(consciousness="X"))
    with pytest.raises(ValueError):
        score(vitals(pulse=80.5))


# --- reading answers back
def test_parse_answer_reads_score_and_band():
    assert parse_answer("Aggregate NEWS2 score: 7\nClinical risk: high (aggregate 7 or more).") == (7, "high")
    assert parse_answer("The total score is 3, so this is low–medium risk.") == (3, "low-medium")
    assert parse_answer("NEWS2 = 5; risk: medium") == (5, "medium")
    assert parse_answer("NEWS2 chart (RCP 2017): I am not sure.") == (None, None)


# --- the source: deterministic, append-only, every band, answers agree with the chart
def _generate(tmp_path, count, seed=7):
    source = make("news2", "news2", {"count": count, "seed": seed})
    store = RawStore(tmp_path)
    source.fetch(store)
    return source, store.pages()


def test_source_is_deterministic_and_growing_count_only_appends(tmp_path):
    _, pages = _generate(tmp_path / "a", 40)
    _, again = _generate(tmp_path / "b", 40)
    _, more = _generate(tmp_path / "c", 50)
    first, second, bigger = (p[0].read_bytes() for p in (pages, again, more))
    assert first == second
    assert bigger.startswith(first) and bigger != first
    _, other_seed = _generate(tmp_path / "d", 40, seed=8)
    assert other_seed[0].read_bytes() != first


def test_source_covers_every_band_and_both_scales_and_answers_match_chart(tmp_path):
    source, pages = _generate(tmp_path, 300)
    records = list(source.parse(pages[0]))
    assert len(records) == 300 and len({r["id"] for r in records}) == 300
    bands = Counter()
    scales = Counter()
    for record in records:
        result = score(record["vitals"])
        bands["zero" if result.aggregate == 0 else result.band] += 1
        v = record["vitals"]
        scales[(v["spo2_scale"], v["on_oxygen"], v["spo2"] >= 93)] += 1
        examples = list(source.examples(record))
        assert {e["task"] for e in examples} == {"news2_score", "news2_response"}
        for example in examples:
            assert [m["role"] for m in example["messages"]] == ["user", "assistant"]
            assert parse_answer(example["messages"][1]["content"]) == (result.aggregate, result.band)
    assert set(bands) == {"zero", "low", "low-medium", "medium", "high"}
    assert min(bands.values()) >= 20
    # scale 2 occurs, including above-target saturations both on air and on oxygen
    assert scales[(2, False, True)] and scales[(2, True, True)] and sum(v for k, v in scales.items() if k[0] == 1)


def test_answer_explains_each_parameter(tmp_path):
    source, pages = _generate(tmp_path, 5)
    record = next(source.parse(pages[0]))
    answer = next(source.examples(record))["messages"][1]["content"]
    for label in ("Respiration rate", "SpO2", "Air or oxygen", "Systolic BP", "Pulse", "Consciousness",
                  "Temperature", "Aggregate NEWS2 score", "Clinical risk", "Response", "Monitoring frequency"):
        assert label in answer
