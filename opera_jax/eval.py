"""`python -m opera_jax.eval`: see opera_jax/evaluate.py."""

from opera_jax.evaluate import main

if __name__ == "__main__":
    main()
