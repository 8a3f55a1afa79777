"""--push_to_hub: upload the output folder to the Hugging Face Hub (or the endpoint HF_ENDPOINT names).

The repository is created (or found) when the run starts, so an unreachable
hub or a refused token stops the script before training, not after it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from flax_finetune.errors import InputError

# Folders of the output directory that stay local: checkpoints (orbax writes them in the background)
# and TensorBoard event files.
NOT_UPLOADED_FOLDERS = ("checkpoints", "tensorboard")


def uploaded_files(folder: Path) -> list[Path]:
    """The files of `folder` that go to the hub: all but NOT_UPLOADED_FOLDERS and *.tmp, in a fixed order.

    The walk never enters a folder it leaves out: orbax may be renaming a checkpoint's temporary
    folder at that moment, and a walk that lists it first and filters later (huggingface_hub's
    upload_folder) fails when it vanishes.
    """
    files = []
    for root, folders, names in os.walk(folder):
        if Path(root) == Path(folder):
            folders[:] = [name for name in folders if name not in NOT_UPLOADED_FOLDERS]
        files += [Path(root) / name for name in names if not name.endswith(".tmp")]
    return sorted(files)


class Hub:
    """One model repository on the hub, and the folder that goes to it."""

    def __init__(self, folder: Path, repo_id: Optional[str], token: Optional[str]):
        self.folder = Path(folder)
        self.repo_id = repo_id or self.folder.resolve().name
        self.token = token

    def connect(self) -> None:
        """Create the repository if needed; an InputError when the hub cannot be reached or refuses."""
        import huggingface_hub

        try:
            url = huggingface_hub.create_repo(self.repo_id, token=self.token, exist_ok=True)
        except Exception as error:  # network, HTTP and auth errors all mean: nothing can be pushed
            endpoint = huggingface_hub.constants.ENDPOINT
            if getattr(getattr(error, "response", None), "status_code", None) == 401:
                raise InputError(
                    f"--push_to_hub: {endpoint} answered 401 Unauthorized: the token is missing or not valid; "
                    "give a write token with --hub_token or HF_TOKEN"
                ) from None
            raise InputError(
                f"--push_to_hub: cannot create or reach {self.repo_id} on {endpoint} "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            ) from None
        self.repo_id = getattr(url, "repo_id", None) or self.repo_id

    def push(self, message: str) -> None:
        """Upload the folder (without checkpoints and event files) as one commit."""
        import huggingface_hub

        operations = [
            huggingface_hub.CommitOperationAdd(path_in_repo=path.relative_to(self.folder).as_posix(), path_or_fileobj=str(path))
            for path in uploaded_files(self.folder)
        ]
        huggingface_hub.HfApi(token=self.token).create_commit(
            repo_id=self.repo_id, operations=operations, commit_message=message
        )
