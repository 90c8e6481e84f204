"""`python -m localization_heads stage=...`: the same command as `localization-heads`."""
from localization_heads.cli import main

if __name__ == "__main__":
    main()
