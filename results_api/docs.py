"""`/openapi.json` and `/docs`: a self-contained HTML page (no CDN) rendered from that document."""

from __future__ import annotations

import json

from flask import Blueprint, Response, jsonify, render_template_string

from results_api.openapi import openapi_document

bp = Blueprint("docs", __name__)

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ doc.info.title }} API</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
code, pre { background: #f4f4f4; padding: .1rem .3rem; }
pre { padding: .8rem; overflow-x: auto; }
.method { display: inline-block; width: 4rem; font-weight: bold; }
section { border-top: 1px solid #ddd; margin-top: 1rem; }
</style></head>
<body>
<h1>{{ doc.info.title }} API</h1>
<p>{{ doc.info.description }} Authenticate with <code>Authorization: Bearer &lt;key&gt;</code>.
Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI {{ doc.openapi }}).</p>
<h2>Routes</h2>
{% for path, operations in doc.paths.items() %}{% for method, op in operations.items() %}
<section><h3><span class="method">{{ method.upper() }}</span> <code>{{ path }}</code></h3>
<p>{{ op.summary }}</p>
{% if op.parameters %}<ul>{% for p in op.parameters %}
<li><code>{{ p.name }}</code> ({{ p["in"] }})
{%- if p.description %}: {{ p.description }}{% endif %}</li>
{% endfor %}</ul>{% endif %}
<p>Responses: {% for status in op.responses %}<code>{{ status }}</code> {% endfor %}</p>
</section>
{% endfor %}{% endfor %}
<h2>Schemas</h2>
{% for name, schema in doc.components.schemas.items() %}
<section><h3 id="{{ name }}">{{ name }}</h3><pre>{{ dumps(schema) }}</pre></section>
{% endfor %}
</body></html>
"""


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(openapi_document())


@bp.get("/docs")
def docs() -> str:
    return render_template_string(DOCS_PAGE, doc=openapi_document(),
                                  dumps=lambda value: json.dumps(value, indent=2))
