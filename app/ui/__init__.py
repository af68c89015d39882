"""The Gradio UI: handlers are plain functions (tested directly); `blocks.py` only wires them to components."""
