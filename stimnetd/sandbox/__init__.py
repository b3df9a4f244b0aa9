"""The job sandbox: Docker runner, result validation, image checks."""

# The sandbox image version this daemon expects (sandbox/VERSION; a test keeps them equal).
SANDBOX_VERSION = "0.1.0"
