"""The Gradio web UI (`dcustom app`)."""
