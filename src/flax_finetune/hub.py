"""--push_to_hub: upload the output folder to the Hugging Face Hub (or the endpoint HF_ENDPOINT names).

The repository is created (or found) when the run starts, so an unreachable
hub or a refused token stops the script before training, not after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from flax_finetune.errors import InputError

NOT_UPLOADED = ["checkpoints/*", "checkpoints/**", "tensorboard/**", "*.tmp"]


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

        huggingface_hub.upload_folder(
            repo_id=self.repo_id, folder_path=str(self.folder), commit_message=message,
            token=self.token, ignore_patterns=NOT_UPLOADED,
        )
