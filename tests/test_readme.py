"""The README's audit schema tables are the schema the code writes."""

import os

from spellshield.pipeline.records import HIT_SCHEMA, SAMPLE_SCHEMA, describe
from tests.conftest import ROOT


def test_schema_tables_match_code():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for schema in (HIT_SCHEMA, SAMPLE_SCHEMA):
        for name, type_, description in describe(schema):
            assert f"| `{name}` | {type_} | {description} |" in readme, name
