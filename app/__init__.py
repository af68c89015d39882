"""The app: FastAPI server, Gradio UI, CLI, scheduler and policy service. Imports storage and learner."""
