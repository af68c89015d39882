"""Generation behind one interface, `PolicyBackend`: in-process transformers, a worker process, or an OpenAI-compatible
inference server (vLLM with LoRA). The app's PolicyService talks to one of them and never to a model directly."""
