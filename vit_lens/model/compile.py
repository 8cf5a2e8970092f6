"""``torch.compile`` that keeps the hook contract: a hook added, removed or changed after compilation takes effect.

Hook points call their hooks through ``nn.Module`` forward hooks. TorchDynamo guards on a module's hook
dicts only where ``torch._dynamo.config.skip_nnmodule_hook_guards`` is False; it is True by default, and
then a module compiled without hooks keeps running the hook-free code after a hook is added: the edit
is silently ignored. With the guards on, a hook edit fails a guard and dynamo recompiles (or reuses the
variant it compiled for that hook configuration before), and past ``torch._dynamo.config.recompile_limit``
variants it runs the forward eagerly, still with the hooks.

:func:`guard_hook_edits` turns the guards on while dynamo traces a HookedViT, before it builds that
trace's guards, so that ``torch.compile(model)`` and ``model.compile()`` both honour hook edits without
the user knowing about the flag. The flag is process-wide; turning it on makes every compiled module
check the length of its empty hook dicts, which is what makes hook edits on those modules safe too.
"""


def guard_hook_edits() -> bool:
    """Turn on TorchDynamo's guards on module hooks (``skip_nnmodule_hook_guards = False``); returns True.

    Called from ``HookedViT.forward`` only while dynamo traces it; dynamo runs it at trace time
    (it is marked as a constant, below) rather than tracing it, and reads the flag when it builds
    the trace's guards, after the trace.
    """
    import torch._dynamo.config  # loaded already: only a compilation calls this

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    return True


# What torch.compiler.assume_constant_result sets, set here directly: the decorator imports torch._dynamo,
# which would add seconds to every `import vit_lens`. tests/test_compile.py fails if dynamo stops honouring it.
guard_hook_edits._dynamo_marked_constant = True  # type: ignore[attr-defined]
