"""Gradient-level task weighting (PCGrad, CAGrad, Aligned-MTL), FAMO, and the per-task gradient helpers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cadmtl.training.weighting import (
    FAMO,
    WEIGHTINGS,
    AlignedMTL,
    CAGrad,
    PCGrad,
    all_reduce_mean,
    build_weighting,
    task_gradients,
    write_gradient,
)
from cadmtl.training.weighting.cagrad import project_to_simplex
from cadmtl.training.weighting.gradients import combine_rows, gram_matrix

TASKS2 = ["cls", "det"]
TASKS3 = ["cls", "det", "seg"]
GRADIENT_METHODS = ["pcgrad", "cagrad", "aligned_mtl"]


def random_gradients(k: int = 3, p: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed))


# --- registry ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "grad_level"),
    [
        ("pcgrad", PCGrad, True),
        ("cagrad", CAGrad, True),
        ("aligned_mtl", AlignedMTL, True),
        ("famo", FAMO, False),
    ],
)
def test_registry_names(name, cls, grad_level):
    assert WEIGHTINGS[name] is cls
    method = build_weighting(name, TASKS2)
    assert isinstance(method, cls)
    assert method.needs_task_gradients is grad_level
    assert method.needs_held_out_losses is False
    assert method.weights == {"cls": 0.5, "det": 0.5}


def test_famo_is_loss_level():
    with pytest.raises(NotImplementedError, match="loss-level"):
        build_weighting("famo", TASKS2).combine_gradients(torch.zeros(2, 3), {})


# --- shared checks of the gradient-level methods ------------------------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_wrong_number_of_rows_is_a_clear_error(name):
    method = build_weighting(name, TASKS3)
    with pytest.raises(
        ValueError, match=r"gradients have 2 rows but there are 3 tasks \['cls', 'det', 'seg'\]"
    ):
        method.combine_gradients(torch.ones(2, 5), {})
    with pytest.raises(ValueError, match=r"must be \(K, P\) = \(3, num_shared_params\), got shape \(15,\)"):
        method.combine_gradients(torch.ones(15), {})
    with pytest.raises(ValueError, match="floating point"):
        method.combine_gradients(torch.ones(3, 5, dtype=torch.int64), {})


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_gradients_name_the_task(name, bad):
    grads = random_gradients()
    grads[1, 7] = bad
    with pytest.raises(ValueError, match=r"non-finite \(inf/NaN\) gradient for task\(s\) \['det'\]"):
        build_weighting(name, TASKS3).combine_gradients(grads, {})


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_bf16_input_upcasts_and_returns_float32(name):
    grads = random_gradients(p=64)
    grads_bf16 = grads.to(torch.bfloat16)
    out = build_weighting(name, TASKS3).combine_gradients(grads_bf16, {})
    assert out.dtype == torch.float32 and out.shape == (64,)
    # same result as the float32 path on the bf16-rounded values (the computation itself is float64)
    expected = build_weighting(name, TASKS3).combine_gradients(grads_bf16.float(), {})
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_agreeing_gradients_sum_scale(name):
    """Identical rows: no conflict, rank 1: PCGrad and Aligned-MTL return the plain sum; CAGrad (rescale 0)
    returns K * (1 + c) * g (d = g0 + c ||g0|| g_w/||g_w|| with g_w = g0)."""
    g = torch.tensor([1.0, -2.0, 0.5])
    grads = g.repeat(3, 1)
    options = {"rescale": 0} if name == "cagrad" else {}
    out = build_weighting(name, TASKS3, **options).combine_gradients(grads, {})
    factor = 3 * 1.4 if name == "cagrad" else 3.0
    torch.testing.assert_close(out, factor * g)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_all_zero_gradients_give_zero(name):
    out = build_weighting(name, TASKS2).combine_gradients(torch.zeros(2, 4), {})
    assert torch.equal(out, torch.zeros(4))


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_chunking_matches_one_chunk(name, monkeypatch):
    """Many small column chunks (Gram blocks summed in float64, bf16 upcast per chunk) give the same answer."""
    grads = random_gradients(p=1000, seed=3)
    expected = build_weighting(name, TASKS3).combine_gradients(grads, {})
    monkeypatch.setattr("cadmtl.training.weighting.gradients.GRAM_BLOCK_COLUMNS", 7)
    monkeypatch.setattr(
        "cadmtl.training.weighting.gradients.CHUNK_COLUMNS", 30
    )  # chunks of 4 blocks, a 6-column rest
    exact = grads.double() @ grads.double().T
    torch.testing.assert_close(gram_matrix(grads), exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        gram_matrix(grads.to(torch.bfloat16)), gram_matrix(grads.to(torch.bfloat16).float())
    )
    coef = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(combine_rows(grads, coef), grads.T @ coef)
    torch.testing.assert_close(build_weighting(name, TASKS3).combine_gradients(grads, {}), expected)


# --- PCGrad ---------------------------------------------------------------------------------------------------


def test_pcgrad_hand_computed():
    # g1.g2 = -1 < 0: g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1); sum (0.5, 1.5)
    method = build_weighting("pcgrad", TASKS2)
    out = method.combine_gradients(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), {})
    assert out.tolist() == [0.5, 1.5]
    assert method.log_dict()["pcgrad/conflicts"] == 2.0


def test_pcgrad_no_conflict_is_the_sum():
    grads = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    method = build_weighting("pcgrad", TASKS2)
    assert method.combine_gradients(grads, {}).tolist() == [1.5, 1.0, 2.0]
    assert method.log_dict()["pcgrad/conflicts"] == 0.0


def pcgrad_reference(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """PCGrad on the vectors themselves (float64), as in the paper's Algorithm 1."""
    g = grads.double()
    projected = g.clone()
    for i, order in enumerate(orders):
        for j in order:
            dot = projected[i] @ g[j]
            if dot < 0:
                projected[i] -= dot / (g[j] @ g[j]) * g[j]
    return projected.sum(0).float()


def conflicting_gradients() -> torch.Tensor:
    """Three pairwise-conflicting gradients whose PCGrad result depends on the visiting order."""
    return torch.tensor([[1.0, 0.0, 0.2], [-0.6, 1.0, 0.1], [-0.5, -0.8, 1.0]])


def test_pcgrad_matches_vector_reference_for_every_order():
    grads = conflicting_gradients()
    method = PCGrad(TASKS3)
    results = set()
    for orders in itertools.product(*[list(itertools.permutations(o)) for o in ([1, 2], [0, 2], [0, 1])]):
        orders = [list(o) for o in orders]
        coef = method.coefficients(gram_matrix(grads), orders)
        got = combine_rows(grads, coef)
        torch.testing.assert_close(got, pcgrad_reference(grads, orders), rtol=1e-6, atol=1e-6)
        results.add(tuple(round(v, 5) for v in got.tolist()))
    assert len(results) > 1  # the order matters for this case, so the seeding below is meaningful


def test_pcgrad_orders_are_seeded_permutations_of_the_others():
    a, b = PCGrad(TASKS3, seed=7), PCGrad(TASKS3, seed=7)
    for step in range(5):
        orders = a.orders(step)
        assert orders == b.orders(step)
        assert [sorted(o) for o in orders] == [[1, 2], [0, 2], [0, 1]]
    assert {str(PCGrad(TASKS3, seed=s).orders(0)) for s in range(20)} != {str(a.orders(0))}


def test_pcgrad_deterministic_and_state_round_trip():
    grads = [conflicting_gradients() + 0.1 * random_gradients(p=3, seed=s) for s in range(8)]
    a, b = PCGrad(TASKS3, seed=3), PCGrad(TASKS3, seed=3)
    outs_a = [a.combine_gradients(g, {}) for g in grads]
    outs_b = [b.combine_gradients(g, {}) for g in grads]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    # checkpoint mid-run, resume in a fresh instance: identical subsequent outputs
    first = PCGrad(TASKS3, seed=3)
    for g in grads[:4]:
        first.combine_gradients(g, {})
    state = first.state_dict()
    assert state == {"num_combined": 4, "num_conflicts": first.num_conflicts}
    resumed = PCGrad(TASKS3, seed=3)
    resumed.load_state_dict(state)
    for g, expected in zip(grads[4:], outs_a[4:]):
        assert torch.equal(resumed.combine_gradients(g, {}), expected)
        assert torch.equal(first.combine_gradients(g, {}), expected)


# --- CAGrad ---------------------------------------------------------------------------------------------------


def cagrad_objective_np(w: torch.Tensor, grads: torch.Tensor, c: float) -> torch.Tensor:
    """F(w) = g_w.g0 + c ||g0|| ||g_w|| for a batch of w (rows), on the vectors, float64."""
    g = grads.double()
    g0 = g.mean(0)
    gw = w @ g
    return gw @ g0 + c * g0.norm() * gw.norm(dim=1)


def cagrad_reference(grads: torch.Tensor, w: torch.Tensor, c: float) -> torch.Tensor:
    """The official update (mean scale, rescale 1) times K, for a given dual solution w."""
    g = grads.double()
    g0 = g.mean(0)
    gw = w @ g
    d = g0 + c * g0.norm() / gw.norm() * gw
    return (d / (1 + c**2) * g.shape[0]).float()


@pytest.mark.parametrize(
    "grads",
    [
        torch.tensor([[1.0, 0.0], [-1.0, 1.0]]),
        torch.tensor([[3.0, 0.5, -1.0], [-0.2, 0.4, 2.0]]),
        torch.tensor([[10.0, 1.0], [-1.0, 0.1]]),  # very different norms, strong conflict
    ],
)
def test_cagrad_two_tasks_against_grid_search(grads):
    c = 0.4
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    ws = torch.stack([t, 1 - t], 1)
    values = cagrad_objective_np(ws, grads, c)
    best = int(values.argmin())
    method = CAGrad(TASKS2, c=c)
    out = method.combine_gradients(grads, {})
    w = method.last_w
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and bool((w >= 0).all())
    assert float(cagrad_objective_np(w[None], grads, c)[0]) <= float(values[best]) + 1e-9
    assert float(w[0]) == pytest.approx(float(t[best]), abs=1e-4)
    torch.testing.assert_close(out, cagrad_reference(grads, w[None].double(), c)[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, cagrad_reference(grads, ws[best : best + 1], c)[0], rtol=1e-3, atol=1e-3)


def test_cagrad_hand_case():
    """g1=(1,0), g2=(-1,1), c=0.4: g0=(0,0.5), sqrt(phi)=0.4*0.5=0.2. With w=(t,1-t), g_w=(2t-1,1-t) and
    F(t)=0.5(1-t)+0.2 sqrt(5t^2-6t+2); F'(t)=-0.5+0.1(10t-6)/sqrt(5t^2-6t+2) has no root (25t^2-30t+14>0) and
    F'(1)=-0.1<0, so w*=(1,0), g_w=g1, ||g_w||=1: d=g0+0.2 g1=(0.2,0.5); /(1+c^2)=1.16; times K=2."""
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    method = CAGrad(TASKS2)
    out = method.combine_gradients(grads, {})
    assert method.last_w.tolist() == pytest.approx([1.0, 0.0], abs=1e-12)
    assert out.tolist() == pytest.approx([0.4 / 1.16, 1.0 / 1.16], rel=1e-6)


def test_cagrad_three_tasks_against_simplex_grid():
    grads = random_gradients(k=3, p=6, seed=11)
    steps = torch.linspace(0, 1, 401, dtype=torch.float64)
    a, b = torch.meshgrid(steps, steps, indexing="ij")
    keep = a + b <= 1
    ws = torch.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], 1)
    grid_best = float(cagrad_objective_np(ws, grads, 0.4).min())
    method = CAGrad(TASKS3)
    method.combine_gradients(grads, {})
    assert float(cagrad_objective_np(method.last_w[None], grads, 0.4)[0]) <= grid_best + 1e-9


def test_cagrad_scale_invariance_and_rescale_options():
    grads = random_gradients(k=3, p=20, seed=5)
    out = CAGrad(TASKS3).combine_gradients(grads, {})
    torch.testing.assert_close(
        CAGrad(TASKS3).combine_gradients(1024 * grads, {}), 1024 * out, rtol=1e-6, atol=1e-6
    )
    raw = CAGrad(TASKS3, rescale=0).combine_gradients(grads, {})
    torch.testing.assert_close(out, raw / 1.16)
    torch.testing.assert_close(CAGrad(TASKS3, rescale=2).combine_gradients(grads, {}), raw / 1.4)
    # c = 0: plain sum
    torch.testing.assert_close(CAGrad(TASKS3, c=0.0).combine_gradients(grads, {}), grads.sum(0))
    with pytest.raises(ValueError, match="rescale must be one of"):
        CAGrad(TASKS3, rescale=3)
    with pytest.raises(ValueError, match="c must be a finite number >= 0"):
        CAGrad(TASKS3, c=-1.0)


def test_cagrad_deterministic_and_stateless():
    grads = random_gradients(seed=9)
    a, b = CAGrad(TASKS3), CAGrad(TASKS3)
    assert torch.equal(a.combine_gradients(grads, {}), b.combine_gradients(grads, {}))
    assert a.state_dict() == {}
    assert set(a.log_dict()) >= {"cagrad/w/cls", "cagrad/w/det", "cagrad/w/seg", "weight/cls"}


def test_project_to_simplex():
    torch.testing.assert_close(
        project_to_simplex(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)),
        torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64),
    )
    torch.testing.assert_close(
        project_to_simplex(torch.tensor([2.0, 0.0], dtype=torch.float64)),
        torch.tensor([1.0, 0.0], dtype=torch.float64),
    )
    torch.testing.assert_close(
        project_to_simplex(torch.tensor([1.0, 1.0, -5.0], dtype=torch.float64)),
        torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64),
    )


# --- Aligned-MTL ----------------------------------------------------------------------------------------------


def test_aligned_mtl_orthogonal_gradients_of_different_norms():
    """g1=(3,0), g2=(0,1): M=diag(9,1), lambda_min=1, B=diag(1/3,1): aligned rows (1,0),(0,1), sum (1,1)."""
    method = AlignedMTL(TASKS2)
    out = method.combine_gradients(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), {})
    assert out.tolist() == pytest.approx([1.0, 1.0], abs=1e-7)
    torch.testing.assert_close(method.last_alpha, torch.tensor([1 / 3, 1.0], dtype=torch.float64))
    assert method.log_dict()["aligned_mtl/rank"] == 2.0


def test_aligned_mtl_collinear_gradients_return_the_sum():
    """g1=(1,0), g2=(2,0): rank 1, lambda=5, v=(1,2)/sqrt5, B=v v^T, alpha=(0.6,1.2), result 0.6 g1 + 1.2 g2=(3,0)."""
    method = AlignedMTL(TASKS2)
    out = method.combine_gradients(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), {})
    assert out.tolist() == pytest.approx([3.0, 0.0], abs=1e-6)
    torch.testing.assert_close(method.last_alpha, torch.tensor([0.6, 1.2], dtype=torch.float64))
    assert method.last_rank == 1


def test_aligned_mtl_aligned_rows_are_orthonormal_times_smallest_singular_value():
    grads = random_gradients(k=3, p=40, seed=2).double()
    gram = grads @ grads.T
    lam, vec = torch.linalg.eigh(gram)
    b = lam.min().sqrt() * (vec * lam.rsqrt()) @ vec.T
    aligned = b @ grads
    sigma_min = torch.linalg.svdvals(grads).min()
    torch.testing.assert_close(aligned @ aligned.T, sigma_min**2 * torch.eye(3, dtype=torch.float64))
    out = AlignedMTL(TASKS3).combine_gradients(grads.float(), {})
    torch.testing.assert_close(out, aligned.sum(0).float(), rtol=1e-5, atol=1e-5)


# --- FAMO -----------------------------------------------------------------------------------------------------


def test_famo_slower_task_gains_weight():
    famo = FAMO(TASKS2)
    for step in range(60):
        famo.observe_train_losses(step, {"cls": 0.9**step, "det": 0.99**step})
    z = famo.task_weights
    assert z["det"] > z["cls"] and z["cls"] + z["det"] == pytest.approx(1.0)
    assert z["det"] > 0.6
    # published loss weights: z over the last losses, normalised (the gradient weights of sum z log l)
    last_cls, last_det = 0.9**59 + 1e-8, 0.99**59 + 1e-8  # the official eps inside the log
    expected_det = (z["det"] / last_det) / (z["det"] / last_det + z["cls"] / last_cls)
    assert famo.weights["det"] == pytest.approx(expected_det, rel=1e-9)
    assert sum(famo.weights.values()) == pytest.approx(1.0)
    assert famo.log_dict()["famo/z/det"] == pytest.approx(z["det"])


def test_famo_weights_before_and_after_first_observation():
    famo = FAMO(TASKS2)
    assert famo.weights == {"cls": 0.5, "det": 0.5}
    famo.observe_train_losses(0, {"cls": 1.0, "det": 4.0})  # no update yet, but the 1/l scaling applies
    assert famo.num_updates == 0
    assert famo.weights == pytest.approx({"cls": 0.8, "det": 0.2})


def test_famo_logit_step_matches_torch_adam():
    """The hand-written Adam step equals torch.optim.Adam(lr, weight_decay=gamma) on J_softmax^T delta,
    as in the official code's update (autograd of softmax with grad_outputs=delta)."""
    famo = FAMO(TASKS3, lr=0.05, gamma=0.01)
    xi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=0.05, weight_decay=0.01)
    losses = [[2.0, 1.0, 0.5], [1.5, 0.99, 0.45], [1.4, 0.9, 0.44], [1.0, 0.89, 0.3], [0.9, 0.7, 0.29]]
    for step, values in enumerate(losses):
        famo.observe_train_losses(step, dict(zip(TASKS3, values)))
        if step:
            delta = (
                torch.tensor(losses[step - 1], dtype=torch.float64).add(1e-8).log()
                - torch.tensor(values, dtype=torch.float64).add(1e-8).log()
            )
            (grad,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
            opt.zero_grad()
            xi.grad = grad
            opt.step()
    torch.testing.assert_close(famo.logits, xi.detach(), rtol=1e-12, atol=1e-12)


def test_famo_state_round_trip_mid_run_and_determinism():
    def losses(step):
        return {"cls": 1.0 / (1 + step), "det": 2.0 / (1 + 0.1 * step), "seg": 0.5 + 0.01 * math.sin(step)}

    a, b = FAMO(TASKS3), FAMO(TASKS3)
    for step in range(10):
        a.observe_train_losses(step, losses(step))
        b.observe_train_losses(step, losses(step))
    assert a.weights == b.weights
    state = a.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float, bool)) for v in state.values())
    resumed = FAMO(TASKS3)
    resumed.load_state_dict(state)
    assert resumed.weights == a.weights
    for step in range(10, 20):
        a.observe_train_losses(step, losses(step))
        resumed.observe_train_losses(step, losses(step))
        assert resumed.weights == a.weights
        assert torch.equal(resumed.logits, a.logits)


def test_famo_missing_task_skips_and_non_finite_raises():
    famo = FAMO(TASKS2)
    famo.observe_train_losses(0, {"cls": 1.0, "det": 1.0})
    famo.observe_train_losses(1, {"cls": 0.5})  # det did not run: no update, differencing restarts
    assert famo.weights == pytest.approx({"cls": 2 / 3, "det": 1 / 3})  # 1/l scaling with det's last loss
    famo.observe_train_losses(2, {"cls": 0.4, "det": 0.9})
    assert famo.num_updates == 0 and famo.log_dict()["famo/skipped"] == 1.0
    famo.observe_train_losses(3, {"cls": 0.3, "det": 0.8})
    assert famo.num_updates == 1
    with pytest.raises(ValueError, match=r"non-finite training loss for task\(s\) \['det'\] at step 4"):
        famo.observe_train_losses(4, {"cls": 0.3, "det": math.nan})
    with pytest.raises(ValueError, match="one value per task"):
        FAMO(TASKS2, min_losses=[0.0])


# --- per-task gradients of the shared parameters ----------------------------------------------------------


def two_loss_model():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 3)
    head_a, head_b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 2)
    x = torch.randn(5, 4)
    feats = torch.tanh(shared(x))
    loss_a = head_a(feats).pow(2).mean()
    loss_b = head_b(feats).sin().sum()
    return shared, (head_a, head_b), (loss_a, loss_b)


def test_task_gradients_rows_are_each_losss_own_gradient():
    shared, _, (loss_a, loss_b) = two_loss_model()
    params = list(shared.parameters())
    expected = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for loss in (loss_a, loss_b)
    ]
    grads = task_gradients([loss_a, loss_b], params)
    assert grads.shape == (2, 4 * 3 + 3) and grads.dtype == torch.float32
    torch.testing.assert_close(grads[0], expected[0])
    torch.testing.assert_close(grads[1], expected[1])
    assert all(p.grad is None for p in params)
    with pytest.raises(RuntimeError):  # graph freed after the last task by default
        loss_b.backward()


def test_task_gradients_unused_parameter_is_zero_and_graph_can_be_kept():
    shared, (head_a, _), (loss_a, loss_b) = two_loss_model()
    extra = torch.nn.Parameter(torch.ones(2))
    grads = task_gradients(
        [loss_a, loss_b * 1.0 + extra.sum()], [*shared.parameters(), extra], retain_graph_last=True
    )
    assert grads[0, -2:].tolist() == [0.0, 0.0] and grads[1, -2:].tolist() == [1.0, 1.0]
    loss_a.backward()  # retained: the heads' own backward still works
    assert head_a.weight.grad is not None
    with pytest.raises(ValueError, match="scalar"):
        task_gradients([torch.ones(2, requires_grad=True)], [extra])


def test_write_gradient_round_trip_adds_to_existing():
    shared, _, (loss_a, loss_b) = two_loss_model()
    params = list(shared.parameters())
    grads = task_gradients([loss_a, loss_b], params)
    flat = grads.sum(0)
    write_gradient(params, flat)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), flat)
    write_gradient(params, flat)  # adds
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), 2 * flat)
    with pytest.raises(ValueError, match="vector of 15 values"):
        write_gradient(params, torch.zeros(14))


def test_write_gradient_casts_to_parameter_dtype():
    p = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))
    write_gradient([p], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert p.grad.dtype == torch.bfloat16 and p.grad.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_all_reduce_mean_identity_without_process_group():
    grads = torch.ones(2, 3)
    assert all_reduce_mean(grads) is grads and grads.tolist() == [[1.0] * 3] * 2


def _all_reduce_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        grads = torch.full((3, 4), float(rank + 1)) * torch.arange(1, 4.0)[:, None]
        out = all_reduce_mean(grads)
        torch.save({"out": out, "calls": calls}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.all_reduce = original
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_mean_two_ranks_one_collective(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    expected = torch.full((3, 4), 1.5) * torch.arange(1, 4.0)[:, None]  # mean of ranks' (1, 2) multiples
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["calls"] == [(3, 4)]  # one all-reduce for all tasks
        torch.testing.assert_close(result["out"], expected)
