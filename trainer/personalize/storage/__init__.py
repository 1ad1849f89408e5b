"""Data in and out of the trainer through fsspec and huggingface_hub.

    locations.py        a URI -> (fsspec filesystem, root); retries; which errors are the user's
    images.py           concept images from s3://, gs:// or https:// (archive or manifest) into the cache
    uploads.py          the output folder -> output.uri, result.json last; retried without retraining
    checkpoint_sync.py  resumable checkpoints mirrored to output.uri (a rescheduled pod resumes)
    hub.py              baseModel.hubId + revision -> a snapshot in the shared HF_HOME cache

Credentials are never read here: the libraries take them from the standard environment
(AWS_*, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN) that the job's Secret provides, or from the
pod's workload identity. Messages name URIs and object keys, never a credential.
"""
