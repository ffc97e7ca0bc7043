from setuptools import find_packages, setup

setup(
    name="ferrytune",
    version="0.1.0",
    description="Fine-tune language models larger than the accelerator: block streaming over device, host and NVMe",
    packages=find_packages(include=["ferrytune", "ferrytune.*"]),
    package_data={
        "ferrytune.data": ["demo/*.jsonl"],
        "ferrytune.service": ["console/*.html", "console/*.js", "console/*.css"],  # the web console at /ui/
    },
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors",
        "tokenizers",
        "pyyaml",
        "pydantic>=2",
        "tqdm",
        "numpy",
        "numba>=0.60",
        "xxhash",
    ],
    extras_require={
        "lora": ["peft>=0.13"],
        "service": ["ray[default,train]>=2.30", "fastapi", "uvicorn", "requests", "matplotlib", "sqlalchemy>=2.0",
                    "aiofiles>=23"],
        # the job store on PostgreSQL: ferrytune serve --db postgresql+psycopg://user:pw@host/db
        "postgres": ["psycopg[binary]>=3.1"],
        "gpu": ["nvidia-ml-py", "triton"],  # NVML telemetry (imports as pynvml) and the CUDA kernels
        # offload.io_backend: deepspeed_aio (its op is JIT-built: also needs libaio-dev and a C++ compiler)
        "aio": ["deepspeed", "ninja"],
        # triton: kernels under TRITON_INTERPRET=1; psycopg: the job-store tests' PostgreSQL leg;
        # selenium: the web console's browser test (with Debian's chromium + chromium-driver);
        # adam-mini / sgd-sai: the references train.optimizer's adam_mini and sgd_sai are tested against
        # step for step (pinned: the tests compare bit for bit)
        "test": ["pytest", "peft>=0.13", "ray[default,train]>=2.30", "fastapi", "uvicorn", "requests",
                 "matplotlib", "sqlalchemy>=2.0", "aiofiles>=23", "psycopg[binary]>=3.1", "httpx", "triton",
                 "selenium>=4.20", "adam-mini==1.1.1", "sgd-sai==1.0.3"],
    },
    entry_points={"console_scripts": ["ferrytune=ferrytune.launch.cli:main"]},
)
