"""A Flask app, served by Scale0 under /flask (see scale0.toml)."""

from __future__ import annotations

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def index() -> str:
    return "Hello from Flask on Scale0!\n"


@app.route("/echo", methods=["GET", "POST"])
def echo() -> object:
    return jsonify(method=request.method, args=request.args, data=request.get_data(as_text=True),
                   path=request.path, script_root=request.script_root)


@app.get("/scheme")
def scheme() -> object:
    """What a TLS front told the app (docs/operating.md, forwarded_allow_ips)."""
    return jsonify(scheme=request.scheme, is_secure=request.is_secure,
                   remote_addr=request.remote_addr, url_root=request.url_root)
