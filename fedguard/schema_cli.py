"""``fedguard schema``'s command line, apart from the drafting code (``fedguard.schema_draft``).

The drafting code reads tables with pandas and the node's data checks, which pull in torch: two
seconds of imports that every other ``fedguard`` command would pay if the parser lived beside it.
"""

from __future__ import annotations

import argparse

#: A text column with more distinct values than this is not drafted as a categorical feature.
MAX_CATEGORIES = 50


def _draft(args: argparse.Namespace) -> int:
    from fedguard.schema_draft import cmd_schema_draft

    return cmd_schema_draft(args)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``fedguard schema draft``."""
    sch = sub.add_parser("schema", help="data schema tools (run next to the data)")
    ssub = sch.add_subparsers(dest="schema_command", required=True)
    d = ssub.add_parser(
        "draft",
        help="draft a data schema from your own data file, for you to review (nothing leaves this machine)",
        description="Read a CSV, Parquet or JSONL file on this machine and print a draft [data.schema]: label "
        "classes, numeric features with ranges (rounded outward), categorical features with their categories, "
        "and a CSV file's delimiter and decimal mark. "
        "Sensitive columns are kept for audits and never made features. Nothing is sent anywhere; review the "
        "draft before it goes into a run config, which the server and every node see.",
    )
    d.add_argument("--data", required=True, help="the data file (CSV, Parquet or JSONL)")
    d.add_argument("--label", required=True, help="the label (class) column")
    d.add_argument("--sensitive", help="comma-separated sensitive columns (audited, never model inputs)")
    d.add_argument("--text", metavar="COLUMN", help="draft a text schema with this text column (no features)")
    d.add_argument("--classes", help="comma-separated classes in order (default: the label values in the file)")
    d.add_argument("--exclude", help="comma-separated columns to leave out (ids, dates, free text)")
    d.add_argument(
        "--max-categories",
        type=int,
        default=MAX_CATEGORIES,
        help=f"leave out text columns with more distinct values (default {MAX_CATEGORIES})",
    )
    d.add_argument(
        "--encoding",
        default="utf-8",
        help='the file\'s text encoding (default utf-8; Western Excel exports are often "cp1252")',
    )
    d.add_argument("--out", help="write the draft to this file (default: stdout)")
    d.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    d.set_defaults(func=_draft)
