"""Serving the exports in inference engines (vLLM: ``vllm_plugin``). Names no method: each method declares what it
serves (``Method.vllm_architectures``)."""
