"""One training step per method, on the host: build the update batch (sample, score, advantages), then run the
jitted update on each mini-batch. The same runner serves every method; only the batch recipe differs.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from exprl_jax import advantages as adv_lib
from exprl_jax import distributed
from exprl_jax import sharding as shd
from exprl_jax.batching import batch_shards, minibatches, to_micro_batches
from exprl_jax.data import QARecord
from exprl_jax.judge.templates import prompt_messages_text
from exprl_jax.methods import loss_mask_key
from exprl_jax.rewards.base import RewardBatch, Span, score_sync
from exprl_jax.rewards.sparse import answer_verdicts, no_correct_frac
from exprl_jax.rollout.weights import make_rollout_params, rollout_model_config
from exprl_jax.rollouts import Rollouts, prompt_text, sample_rollouts, score_responses, sequence_batch
from exprl_jax.sampling import pad_prompts

log = logging.getLogger(__name__)


def sft_batch(records: list[QARecord], tokenizer, *, seq_len: int, template: str, eos: int, pad: int,
              chat: bool = False):
    """(problem prompt -> reference + EOS) sequences, right-padded/truncated to seq_len; loss on reference tokens."""
    tokens = np.full((len(records), seq_len), pad, np.int32)
    attention = np.zeros((len(records), seq_len), np.int32)
    loss_mask = np.zeros((len(records), seq_len - 1), np.float32)
    truncated = 0
    for i, r in enumerate(records):
        prompt = tokenizer.encode(prompt_text(tokenizer, r, template, chat), add_special_tokens=False)
        target = tokenizer.encode(r.reference, add_special_tokens=False) + [eos]
        seq = (prompt + target)[:seq_len]
        truncated += len(prompt) + len(target) > seq_len
        tokens[i, :len(seq)] = seq
        attention[i, :len(seq)] = 1
        loss_mask[i, len(prompt) - 1:len(seq) - 1] = 1.0  # entry t scores token t+1
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}, {
        "data/truncated_frac": truncated / len(records)}


class StepRunner:
    """The three phases of a sampled step, so the loop can overlap them: `sample` (device), `score` (host: judge /
    teacher / advantages; safe to run on a worker thread while the device samples the next step), `update`."""

    def __init__(self, exp, update_fn):
        self.exp, self.cfg, self.update_fn = exp, exp.cfg, update_fn
        self.reward_fn = None  # process 0 alone judges (every row) and shares the rewards; see `rl_step`
        if exp.spec.reward is not None and distributed.is_primary():
            from exprl_jax.rewards.factory import make_reward_fn

            self.reward_fn = make_reward_fn(self.cfg, exp.workdir, exp.train_records)
        if exp.spec.teacher:
            from exprl_jax.judge.templates import load_template

            self.teacher_template = load_template("self-distill-teacher")
        self._judge_pool = ThreadPoolExecutor(max_workers=1)  # the judge runs beside the device, never inside jit
        self._prefetched = None  # (rollouts, scoring future) of the next step, started as soon as it was sampled
        rollout = self.cfg.rollout
        self.rollout_model_cfg = rollout_model_config(exp.model_cfg, "" if rollout.dtype == "auto" else rollout.dtype)
        self.rollout_params = make_rollout_params(exp.model_cfg, self.rollout_model_cfg, exp.mesh)
        low_precision = exp.model_cfg.dtype != "float32" or self.rollout_model_cfg.dtype != "float32"
        self.recompute_logprobs = rollout.recompute_logprobs == "true" or (
            rollout.recompute_logprobs == "auto" and low_precision)

    def close(self):
        self._judge_pool.shutdown()
        close = getattr(self.reward_fn, "close", None)
        if close is not None:
            close()

    # ---- one sampled step: score on a worker thread while the device works, then update ----
    def rl_step(self, state, rollouts: Rollouts, key, *, sample_next=None):
        """Scores `rollouts` (host thread) while the device computes reference / teacher log-probs and, given
        `sample_next(params)`, samples the next step with the pre-update params (judge overlap). Then builds the
        batch and updates. The next step's rollouts go to the judge as soon as they exist, so their scoring also
        runs beside this step's update. Returns (state, metrics, next step's rollouts or None)."""
        scoring = self._scoring_of(rollouts) if distributed.is_primary() else None
        t_device = time.time()
        ref_logprobs = self.reference_logprobs(rollouts)
        pending, sample_s = sample_next(state.params) if sample_next is not None else (None, 0.0)
        if pending is not None and distributed.is_primary():
            # judged from now on, queued behind this step's scoring (one worker); rewards never depend on params
            self._prefetched = (pending, self._judge_pool.submit(self.score, pending))
        device_done = time.time()
        scored = distributed.from_primary(lambda: scoring.result())  # every process: the same rewards
        judge_s, waited = scored[3], max(0.0, time.time() - device_done)
        batch, metrics = self.build_batch(rollouts, scored, ref_logprobs)
        t = time.time()
        if batch["response_mask"].any():
            state, update_metrics = self.update(state, batch, key)
            metrics.update(update_metrics)
        else:  # nothing scored: no update, so AdamW does not decay the weights on a zero gradient
            metrics["update/skipped"] = 1.0
            log.warning("optimizer step %d: no rollout could be scored; update skipped", int(state.step) + 1)
        # time/judge_hidden_frac: the share of the judge's wall time spent while the device was busy
        metrics.update({"time/sample_s": sample_s, "time/reward_s": judge_s, "time/update_s": time.time() - t,
                        "time/device_while_judging_s": device_done - t_device,
                        "time/judge_hidden_frac": 1.0 - waited / judge_s if judge_s > 0 else 1.0})
        return state, metrics, pending

    def _scoring_of(self, rollouts: Rollouts):
        """The scoring of `rollouts`: the one the previous step started when it sampled them, else a new one."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] is rollouts:
            return prefetched[1]
        return self._judge_pool.submit(self.score, rollouts)

    # ---- SFT: no sampling ----
    def sft_step(self, state, records: list[QARecord], key):
        t = time.time()
        batch, metrics = sft_batch(records, self.exp.tokenizer, seq_len=self.cfg.train.seq_len,
                                   template=self.cfg.data.prompt_template, eos=self.exp.eos[0], pad=self.exp.pad,
                                   chat=self.cfg.data.chat_template)
        metrics["time/batch_s"] = time.time() - t
        t = time.time()
        state, update_metrics = self.update(state, batch, key)
        return state, {**metrics, **update_metrics, "time/update_s": time.time() - t}

    # ---- sampled methods ----
    def sample(self, params, records: list[QARecord], key) -> tuple[Rollouts, float]:
        """Rollouts of `records` under `params`. With rollout.recompute_logprobs on, their behaviour log-probs
        are then recomputed by the training forward with the same params, so the first mini-batch's ratio is
        exactly 1 even when the sampler's low-precision log-probs differ from the trainer's (SPEC §5)."""
        t = time.time()
        rollouts = sample_rollouts(self.rollout_model_cfg, self.rollout_params(params), self.exp.tokenizer, records,
                                   key, rollout_cfg=self.cfg.rollout, template=self.cfg.data.prompt_template,
                                   eos=self.exp.eos, pad=self.exp.pad, mesh=self.exp.mesh,
                                   chat=self.cfg.data.chat_template)
        if self.recompute_logprobs:
            recomputed = self._logprobs(params, rollouts)
            mask = rollouts.response_mask.astype(bool)
            rollouts.logprob_gap_max = float(np.abs(recomputed - rollouts.logprobs)[mask].max(initial=0.0))
            rollouts.logprobs = recomputed
        return rollouts, time.time() - t

    def _logprobs(self, params, r: Rollouts) -> np.ndarray:
        batch = sequence_batch(r.prompt_tokens, r.prompt_mask, r.tokens, r.response_mask)
        return score_responses(self.exp.model_cfg, params, batch, self.cfg.rollout.temperature, self.exp.mesh,
                               chunk=self.cfg.train.micro_batch_size)

    def reference_logprobs(self, r: Rollouts) -> np.ndarray | None:
        """Log-probs of the rollouts under the frozen initial policy (device work, independent of rewards)."""
        if self.exp.spec.teacher:
            return self._teacher_logprobs(r)
        if not self.cfg.loss.kl_coef:
            return None
        return self._logprobs(self.exp.ref_params, r)

    def score(self, r: Rollouts):
        """Host work of a step: rewards (judge or answer check) or nothing (self-distillation). Thread-safe."""
        t = time.time()
        if self.reward_fn is None:
            return None, None, self._sparse_correct(r), time.time() - t
        segments = self._segments(r) if self.reward_fn.kind == "process" else None
        records = r.row_records()
        reward_batch = RewardBatch(problems=[x.problem for x in records], references=[x.reference for x in records],
                                   answers=[x.answer for x in records], responses=r.texts, truncated=r.truncated,
                                   group_size=r.group_size, segments=segments, domains=[x.domain for x in records])
        result = score_sync(self.reward_fn, reward_batch)
        # a sparse reward is the answer check itself: run once per step (NaN: the checker gave no verdict)
        correct = (np.where(result.valid, result.scores, np.nan) if self.exp.spec.reward == "sparse"
                   else self._sparse_correct(r))
        return result, segments, correct, time.time() - t

    def build_batch(self, r: Rollouts, scored, ref_logprobs):
        """Advantages (SPEC §4) and the update batch; unscored rollouts are masked out of the loss."""
        result, segments, correct, _ = scored
        metrics = self._rollout_metrics(r, correct)
        mask = r.response_mask
        if self.exp.spec.teacher:
            batch = sequence_batch(r.prompt_tokens, r.prompt_mask, r.tokens, mask)
            batch["teacher_logprobs"] = ref_logprobs
            return batch, metrics
        cfg = self.cfg
        metrics.update({**result.metrics, "reward/unscored_frac": 1.0 - result.valid.mean()})
        if result.scores is not None:
            scores = np.where(result.valid, result.scores, np.nan)
            adv_N = adv_lib.grpo(scores, r.group_size, scale_by_std=cfg.loss.scale_by_std == "true",
                                 valid=result.valid, variant=cfg.loss.grpo_variant)
            adv_NR, valid = adv_N[:, None] * mask, result.valid
            metrics.update({"reward/mean": np.nanmean(scores) if valid.any() else np.nan,
                            "reward/std": np.nanstd(scores) if valid.any() else np.nan})
            if self.exp.spec.reward != "sparse":
                from exprl_jax.judge.monitors import judge_verifier_agreement

                metrics.update(judge_verifier_agreement(scores, correct, valid, group_size=r.group_size))
        else:
            seg_adv = adv_lib.process(result.segment_scores, r.group_size, mode=cfg.process.mode,
                                      single_segment=cfg.process.single_segment, variant=cfg.process.variant,
                                      spans=segments, padded_length=cfg.rollout.max_new_tokens,
                                      overlong_last_scores=result.overlong_last_scores)
            adv_NR, valid = adv_lib.spread_batch(seg_adv, [s if a is not None else None for s, a in
                                                           zip(segments, seg_adv)], r.lengths, mask.shape[1])
            scored = [s for s in result.segment_scores if s is not None]
            metrics.update(adv_lib.segment_stats([len(s) for s in segments]))
            metrics["reward/mean"] = float(np.mean([s.mean() for s in scored])) if scored else np.nan
        mask = mask * valid[:, None]  # an unscored rollout is dropped from the loss, never given reward 0
        batch = sequence_batch(r.prompt_tokens, r.prompt_mask, r.tokens, mask)
        batch["old_logprobs"] = r.logprobs * mask
        batch["advantages"] = adv_NR.astype(np.float32) * mask
        batch["ref_logprobs"] = (ref_logprobs * mask if ref_logprobs is not None
                                 else np.zeros_like(batch["old_logprobs"]))
        return batch, metrics

    def _sparse_correct(self, r: Rollouts) -> np.ndarray:
        """[N] the final-answer check, logged in every method (SPEC §4 "Sparse"): 1 / 0 (truncated rows 0), NaN
        where the checker gave no verdict (excluded and counted)."""
        return answer_verdicts(r.texts, [rec.answer for rec in r.row_records()], r.truncated,
                               style=self.cfg.data.answer_style)[0]

    def _rollout_metrics(self, r: Rollouts, correct: np.ndarray) -> dict:
        metrics = {"reward/sparse_acc": np.nanmean(correct) if not np.isnan(correct).all() else np.nan,
                   "reward/sparse_no_verdict": float(np.isnan(correct).sum()),
                   "reward/no_correct_frac": no_correct_frac(correct, r.group_size),
                   "response/length_mean": r.lengths.mean(), "response/length_max": r.lengths.max(),
                   "response/truncated_frac": r.truncated.mean()}
        if r.logprob_gap_max is not None:  # the largest sampler-vs-trainer log-prob difference (recompute on)
            metrics["rollout/logprob_gap_max"] = r.logprob_gap_max
        return metrics

    def _segments(self, r: Rollouts):
        from exprl_jax.judge.segment import segment_batch

        segments = segment_batch(r.tokens, r.lengths, self._decode, self.cfg.process.delimiter,
                                 variant=self.cfg.process.variant)
        # a response with no text (EOS only) is still judged, as one empty step, rather than dropped
        return [s if s or not n else [Span("", 0, int(n))] for s, n in zip(segments, r.lengths)]

    def _teacher_logprobs(self, r: Rollouts) -> np.ndarray:
        """Teacher = frozen initial policy conditioned on problem + reference (SPEC §6)."""
        prompts = []
        for rec in r.records:
            text = prompt_messages_text(self.exp.tokenizer,
                                        self.teacher_template.render(problem=rec.problem, reference=rec.reference))
            prompts.append(self.exp.tokenizer.encode(text, add_special_tokens=False))
        t_tokens, t_mask = pad_prompts(prompts, self.exp.pad)
        G = r.group_size
        teacher_batch = sequence_batch(np.repeat(t_tokens, G, 0), np.repeat(t_mask, G, 0), r.tokens, r.response_mask)
        return score_responses(self.exp.model_cfg, self.exp.ref_params, teacher_batch, self.cfg.rollout.temperature,
                               self.exp.mesh, chunk=self.cfg.train.micro_batch_size)

    def _decode(self, ids):
        # special tokens (EOS) decode to "", so a trailing EOS joins the last segment instead of forming one
        return self.exp.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- the jitted update over mini-batches ----
    def update(self, state, batch, key):
        """One optimizer step per PPO mini-batch, each split into micro-batches inside the jitted step. A
        mini-batch with no loss token (all rows unscored or padding) takes no optimizer step."""
        method = self.cfg.method
        size = self.cfg.loss.ppo_mini_batch_size if method != "sft" else 0
        mask_key = loss_mask_key(method)
        shards = batch_shards(self.exp.mesh)
        collected, skipped = [], 0
        for i, mini in enumerate(minibatches(batch, size)):
            if not mini[mask_key].any():
                skipped += 1
                continue
            micro = to_micro_batches(mini, self.cfg.train.micro_batch_size, shards)
            state, m = self.update_fn(state, shd.shard_batch(micro, self.exp.mesh, leading_axes=1),
                                      jax.random.fold_in(key, i))
            collected.append(jax.device_get(m))
        metrics = {"update/minibatches": len(collected), "update/skipped_minibatches": skipped}
        if not collected:
            return state, metrics
        # ratios are judged by their worst mini-batch; everything else is the mean over mini-batches
        metrics.update({k: float(np.max([m[k] for m in collected]) if k.endswith("/max")
                                 else np.mean([m[k] for m in collected])) for k in collected[0]})
        if not np.isfinite(metrics["loss/total"]):
            raise FloatingPointError(f"non-finite loss {metrics['loss/total']} at optimizer step {int(state.step)}")
        return state, metrics
