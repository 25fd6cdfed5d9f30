"""tokenmill: a Python LLM inference engine.

    import tokenmill
    llm = tokenmill.load()                      # the default model (smollm2), or a .gguf file / HF folder
    print(llm.generate("What is the capital of France?", chat=True, temperature=0).text)
"""
from tokenmill.errors import InvalidRequestError, ModelLoadError, TokenmillError, UnsupportedError
from tokenmill.llm import LLM, load
from tokenmill.sampling.params import SamplingParams
from tokenmill.engine.sequence import Completion

__version__ = "0.1.0"
__all__ = ["LLM", "Completion", "SamplingParams", "load", "TokenmillError", "ModelLoadError", "UnsupportedError",
           "InvalidRequestError", "__version__"]
