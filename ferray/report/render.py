"""A small document model written out as Markdown and as standalone HTML (the same content)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field


@dataclass
class Document:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    def table(self, header: list[str], rows: list[list], note: str = "") -> None:
        self.blocks.append(("table", list(header), [[str(c) for c in row] for row in rows], note))

    def image(self, path: str, caption: str) -> None:
        self.blocks.append(("image", path, caption))

    def code(self, text: str, language: str = "", summary: str = "") -> None:
        self.blocks.append(("code", text, language, summary))

    # ------------------------------------------------------------------------------------ markdown
    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *rest in self.blocks:
            out += getattr(self, f"_md_{kind}")(*rest) + [""]
        return "\n".join(out)

    @staticmethod
    def _md_heading(level, text):
        return ["#" * level + " " + text]

    @staticmethod
    def _md_paragraph(text):
        return [text]

    @staticmethod
    def _md_bullets(items):
        return [f"- {item}" for item in items]

    @staticmethod
    def _md_table(header, rows, note):
        cell = lambda c: c.replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
        return lines + ([f"\n{note}"] if note else [])

    @staticmethod
    def _md_image(path, caption):
        return [f"![{caption}]({path})", "", f"*{caption}*"]

    @staticmethod
    def _md_code(text, language, summary):
        body = [f"```{language}", text.rstrip("\n"), "```"]
        return [f"<details><summary>{summary}</summary>", "", *body, "", "</details>"] if summary else body

    # ---------------------------------------------------------------------------------------- html
    def html(self) -> str:
        parts = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
            "pre{background:#f6f6f6;padding:.6em;overflow:auto}figcaption{font-style:italic}</style>",
            f"</head><body><h1>{html.escape(self.title)}</h1>",
        ]
        for kind, *rest in self.blocks:
            parts.append(getattr(self, f"_html_{kind}")(*rest))
        return "\n".join(parts + ["</body></html>"]) + "\n"

    @staticmethod
    def _html_heading(level, text):
        return f"<h{level}>{html.escape(text)}</h{level}>"

    @staticmethod
    def _html_paragraph(text):
        return f"<p>{_inline(text)}</p>"

    @staticmethod
    def _html_bullets(items):
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>"

    @staticmethod
    def _html_table(header, rows, note):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>" + (f"<p><small>{_inline(note)}</small></p>" if note else "")

    @staticmethod
    def _html_image(path, caption):
        return (
            f"<figure><img src='{html.escape(path)}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    @staticmethod
    def _html_code(text, language, summary):
        pre = f"<pre><code>{html.escape(text)}</code></pre>"
        return f"<details><summary>{html.escape(summary)}</summary>{pre}</details>" if summary else pre


def _inline(text: str) -> str:
    """Markdown's `code` spans as <code>, everything else escaped."""
    pieces = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))
