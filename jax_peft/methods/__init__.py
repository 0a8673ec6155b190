"""PEFT methods as pure functions on parameter pytrees; see `base.Method` for the contract."""

from jax_peft.methods.base import Method, get_method, init_head, method_names

__all__ = ["Method", "get_method", "init_head", "method_names"]
