"""rin_scale: distributed training of Recurrent Interface Networks (RIN) with DeepSpeed."""
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
# torch/torchvision are not pinned here: clusters bring their own CUDA build (see README).
runtime, _, tests = (here / "requirements.txt").read_text().partition("# tests")
pins = lambda text: [ln.split("#")[0].strip() for ln in text.splitlines() if ln.split("#")[0].strip()]  # noqa: E731
requirements, test_requirements = pins(runtime), pins(tests.partition("\n")[2])

setup(
    name="rin_scale",
    version="0.1.0",
    description="Distributed training of Recurrent Interface Network diffusion models",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=["rin_scale", "launch", "data_tools", "evals"],
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "torchvision"] + requirements,
    extras_require={"test": test_requirements},
    entry_points={
        "console_scripts": [
            "rin-train=rin_scale.train:main",
            "rin-info=rin_scale.info:main",
            "rin-sample=rin_scale.sample:main",
            "rin-shard=data_tools.shard:main",
            "rin-inspect=data_tools.check:main",
            "rin-submit=launch.submit:main",
            "rin-status=launch.status:main",
            "rin-demo=launch.demo:main",
            "rin-eval=evals.service:main",
            "rin-reference=evals.reference:main",
        ]
    },
)
