"""Gradients of ``sum(layer(x) * dy)`` on whichever Keras backend this process runs:
the one piece of the suite that must speak each framework's own autodiff."""

import keras
import numpy as np


def grads(layer, x, dy, training=False):
    """(y, dL/dx, [dL/dv for v in layer.trainable_variables]) as NumPy arrays."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=training)
            loss = tf.reduce_sum(y * tf.constant(dy))
        gx, *gv = tape.gradient(loss, [xt] + list(layer.trainable_variables))
        return y.numpy(), gx.numpy(), [g.numpy() for g in gv]
    if backend == "torch":
        import torch
        xt = torch.tensor(x, requires_grad=True)
        params = [v.value for v in layer.trainable_variables]
        for p in params:
            p.grad = None
        y = layer(xt, training=training)
        (y * torch.tensor(dy)).sum().backward()
        return (y.detach().cpu().numpy(), xt.grad.numpy(),
                [p.grad.detach().cpu().numpy() for p in params])
    if backend == "jax":
        import jax
        import jax.numpy as jnp
        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]

        # stateless_call hands its keyword arguments to call() as they are (unlike __call__,
        # it does not drop `training` for a call() without it, e.g. Conv2D's)
        kw = {"training": training} if layer._call_has_training_arg else {}

        def loss(tv, xv):
            y, _ = layer.stateless_call(tv, ntv, xv, **kw)
            return jnp.sum(y * dy), y

        (_, y), (gv, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(tv, jnp.asarray(x))
        return np.asarray(y), np.asarray(gx), [np.asarray(g) for g in gv]
    raise RuntimeError(f"no gradient helper for the Keras backend {backend!r}")
