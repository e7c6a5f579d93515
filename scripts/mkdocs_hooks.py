"""MkDocs hook (mkdocs.yml `hooks:`): heading anchors spelled as GitHub spells them, so that one
link, `cli.md#checkpoints-and-resuming` or `configuration.md#overrides---set-keyvalue`, works on
the built site and on GitHub alike (Python-Markdown's own slugs fold `--` into `-`)."""

import re


def github_slug(value: str, separator: str = "-") -> str:
    """GitHub's anchor for a heading's text: lower case, every character that is not a letter,
    digit, `_`, `-` or space dropped, each space a hyphen (runs are not folded)."""
    return re.sub(r"[^\w\- ]", "", value.strip().lower()).replace(" ", separator)


def on_config(config):
    config.mdx_configs.setdefault("toc", {})["slugify"] = github_slug
    return config
