"""`python pipeline.py stage=<stage> ...` in a clone: the same command as `localization-heads`
(localization_heads/cli.py), kept so the seed's commands work unchanged."""
from localization_heads.cli import main

if __name__ == "__main__":
    main()
