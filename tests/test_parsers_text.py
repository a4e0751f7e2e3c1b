"""The one text renderer every parser shares (stages/sources/_text.py): HTML, XML narrative, Markdown."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from stages import registry
from stages.sources._text import html_to_text, markdown_to_text, strip_section_number, xml_to_text


def test_html_lists_nest_tables_are_rows_and_entities_decode():
    html = ("<h3>Symptoms</h3><p>Common&nbsp;signs:</p><ul><li>Wheezing<ul><li>worse at night</li></ul></li>"
            "<li><p>Cough</p><p>often dry</p></li></ul><table><tr><th>Grade</th><th>FEV<sub>1</sub></th></tr>"
            "<tr><td><p>Mild</p><p>(step 1)</p></td><td>&ge; 80%</td></tr></table><script>x()</script>")
    assert html_to_text(html) == ("Symptoms\nCommon signs:\n- Wheezing\n  - worse at night\n- Cough\n  often dry\n"
                                  "Grade | FEV1\nMild (step 1) | ≥ 80%")


def test_markdown_ordered_lists_keep_their_numbers_and_escapes_resolve():
    md = "Criteria:\n\n3. first \\> 2\n4. second\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    assert markdown_to_text(md) == "Criteria:\n3. first > 2\n4. second\na | b\n1 | 2"
    assert markdown_to_text("  \n") == ""


def test_xml_narrative_sub_sup_underline_and_footnotes():
    elem = ET.fromstring('<text xmlns="urn:hl7-org:v3"><paragraph>C<sub>max</sub> rose 2<sup>nd</sup> week; '
                         'H<sub>2</sub>O; VIAGRA<sup>®</sup>; age <u>&gt;</u>65</paragraph><list listType="ordered">'
                         '<item>one</item><item>two<footnote>see table</footnote></item></list>'
                         '<renderMultiMedia referencedObject="MM1"/></text>')
    assert xml_to_text(elem) == "C_max rose 2^nd week; H2O; VIAGRA®; age ≥65\n1. one\n2. two (see table)"
    assert xml_to_text(None) == ""


def test_section_numbers():
    assert strip_section_number("1 INDICATIONS AND USAGE VIAGRA is") == "INDICATIONS AND USAGE VIAGRA is"
    assert strip_section_number("2.1\tDosage Information") == "Dosage Information"
    assert strip_section_number("12 CLINICAL PHARMACOLOGY") == "CLINICAL PHARMACOLOGY"
    for dose in ("10 mg tablets", "10 MG tablets", "2 Tablets daily", "5.5 hours", "3 times a day"):
        assert strip_section_number(dose) == dose  # a dose opening the text is not a section number
    assert strip_section_number("Uses temporarily relieves") == "Uses temporarily relieves"


def test_normalize_tasks_depend_on_the_helpers_a_source_uses():
    deps = {kind: {p.rsplit("/sources/", 1)[-1] for p in registry.source_code(kind)}
            for kind in ("dailymed", "clinicaltrials", "news2")}
    assert {"dailymed.py", "_xml.py", "_text.py"} <= deps["dailymed"]
    assert "_text.py" in deps["clinicaltrials"] and "_xml.py" not in deps["clinicaltrials"]
    assert not {"_xml.py", "_text.py"} & deps["news2"]
