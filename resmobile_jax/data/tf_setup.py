"""TensorFlow is only the input pipeline here: it must never take GPU/TPU memory from JAX."""

_done = False


def hide_accelerators_from_tensorflow() -> None:
    global _done
    if _done:
        return
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    try:
        tf.config.set_visible_devices([], "TPU")
    except (ValueError, RuntimeError):  # no TPU device type registered in this TF build
        pass
    _done = True
