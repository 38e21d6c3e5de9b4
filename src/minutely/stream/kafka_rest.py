"""Resting caught-up partitions of a Kafka consumer, so an idle consumer costs no CPU.

librdkafka fetches an assigned partition again as soon as its last fetch is answered, and leaves
the waiting to the broker, which holds a fetch at a partition's end for ``fetch.wait.max.ms``.
A broker that answers such a fetch at once instead (some single-node and test brokers do) makes
the consumer's broker thread spin: tens of thousands of empty fetches a second, a CPU core of
mostly system time per consumer, for as long as it is caught up. Two things prevent it:

* the consumer defaults ``queued.min.messages = 1`` (see :mod:`.kafka_client`): librdkafka does
  not fetch while anything it fetched (records, an end-of-partition event) waits to be
  consumed, so a consumer that is not polled stops fetching;
* that leaves a partition whose records and end event the consumer has taken (librdkafka
  reports an end once, then fetches on): once it is known to be read to its end it *rests* (is
  paused) until a poll asks for records again. :meth:`Resting.wake` resumes it and asks where it
  ends; one with nothing new rests again at once.

A resting partition loses nothing: it resumes from the offset after the last record delivered.
librdkafka notices a resumed partition only on its broker thread's next round (up to a second
later); the end-offset request that :meth:`Resting.wake` sends right after resuming starts that
round at once, so a woken partition is fetched within a round trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from confluent_kafka import Consumer, KafkaException, TopicPartition

from minutely.stream.kafka_client import LOG, describe


class Resting:
    """Which partitions of one consumer rest, and what says that an awake one is caught up.

    ``reached`` arguments map each assigned partition to the offset librdkafka has fetched it
    through: after the last record delivered, or the offset of an end-of-partition event after
    it. The client calls raise :class:`KafkaException`; the consumer translates them.
    """

    def __init__(self, topic: str, where: str) -> None:
        self._topic = topic
        self._where = where
        self.parts: set[int] = set()
        # Awake partitions whose last fetched event was their end, and those that got a record
        # since they woke: what a poll has seen of each since.
        self._ended: set[int] = set()
        self._fed: set[int] = set()

    def record(self, partition: int) -> None:
        self._fed.add(partition)
        self._ended.discard(partition)

    def end(self, partition: int) -> None:
        self._ended.add(partition)

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop what was seen of ``partitions`` (after a seek, an assignment change)."""
        for p in partitions:
            self._ended.discard(p)
            self._fed.discard(p)

    def settle(self, client: Consumer, reached: Mapping[int, int]) -> list[int]:
        """Rest every awake partition that is caught up; returns those put to rest.

        Caught up: its end-of-partition event came after its last record, or a record came since
        it woke and it is fetched through the high watermark of the fetch that brought it.
        """
        caught = [
            p
            for p in sorted(reached)
            if p not in self.parts
            and (p in self._ended or (p in self._fed and reached[p] >= self._cached_end(client, p)))
        ]
        self._pause(client, caught)
        return caught

    def wake(
        self,
        client: Consumer,
        reached: Mapping[int, int],
        timeout_s: float,
        only: Iterable[int] | None = None,
    ) -> None:
        """Resume the resting partitions (or those of ``only``) and ask each one's end offset;
        one with nothing past ``reached`` rests again. One whose end cannot be had within
        ``timeout_s`` stays awake (as do the rest): librdkafka retries its fetches itself."""
        woken = sorted(self.parts if only is None else self.parts.intersection(only))
        if not woken:
            return
        client.resume(self._tps(woken))
        self.parts.difference_update(woken)
        self.forget(woken)
        caught: list[int] = []
        for p in woken:
            try:
                _, end = client.get_watermark_offsets(
                    TopicPartition(self._topic, p), timeout=timeout_s, cached=False
                )
            except KafkaException as exc:
                LOG.info(
                    "%s: end offset of partition %d unknown: %s", self._where, p, describe(exc)
                )
                break
            if reached.get(p, 0) >= end:
                caught.append(p)
        self._pause(client, caught)

    def release(self, client: Consumer) -> None:
        """Resume every resting partition: a pause outlives an assignment change in librdkafka,
        so this comes before one."""
        woken = sorted(self.parts)
        self.parts.clear()
        self._ended.clear()
        self._fed.clear()
        if woken:
            client.resume(self._tps(woken))

    def all_rest(self, assigned: Iterable[int]) -> bool:
        """Whether every one of ``assigned`` (at least one) rests."""
        parts = set(assigned)
        return bool(parts) and parts <= self.parts

    def _pause(self, client: Consumer, parts: list[int]) -> None:
        """Pause ``parts`` until a poll wakes them."""
        if parts:
            client.pause(self._tps(parts))
            self.parts.update(parts)
            self.forget(parts)

    def _cached_end(self, client: Consumer, partition: int) -> int:
        """The high watermark of the last fetch answered for ``partition`` (no request); a
        value no offset reaches when it is unknown."""
        try:
            _, high = client.get_watermark_offsets(
                TopicPartition(self._topic, partition), cached=True
            )
        except KafkaException:
            return 2**63
        return int(high) if high is not None and high >= 0 else 2**63

    def _tps(self, parts: list[int]) -> list[TopicPartition]:
        return [TopicPartition(self._topic, p) for p in parts]
