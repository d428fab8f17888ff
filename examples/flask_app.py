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
