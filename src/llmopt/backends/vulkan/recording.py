"""Recordings: command buffers recorded once and submitted many times, waited for now or later.

``Device`` (``llmopt.backends.vulkan.device``) takes these methods from ``Recordings``:

    dev.begin_recording(); ...record dispatches and copies...; rec = dev.end_recording()
    dev.submit((prologue, rec, tail))                      # one submission, waited for
    ticket = dev.submit((prologue, rec, tail), wait=False)  # queued; the host goes on
    dev.wait(ticket)                                       # its commands (and every earlier one) have run

Each recording starts with a barrier after every earlier compute and transfer write on the queue, earlier
submissions included (a pipeline barrier's first scope is everything before it in submission order), so
submissions queued back to back without a host wait in between, such as two decode steps in flight
(``llmopt.backends.vulkan.replay``), read what the one before wrote. Each ends with its writes made visible to the
host. A ticket is a fence of its own (one per submission in flight, reused once waited for).

``begin_recording(profile=True)`` gives the recording a timestamp query pool of its own, reset inside the
recording and written after every command, so each submission times its commands at the clocks of real use;
``collect(rec)``, after the submission was waited for, adds each command's time to ``rec.times`` (ms, by kernel
name) and ``rec.counts``. One profiled recording must not be in flight twice at once (the second would reset
the pool the first is writing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmopt.errors import LlmoptError

MAX_TIMESTAMPS = 8192  # timestamp queries a pool holds


@dataclass(eq=False)
class Recording:
    """A command buffer recorded once (``Device.begin_recording``/``end_recording``) and submitted many times."""

    cmd: object
    n_commands: int
    query_pool: object = None  # profiled recordings: timestamps after every command
    labels: list | None = None  # the label of each timestamp's command (Device.dispatch; profiled recordings)
    times: dict = field(default_factory=dict)  # label -> ms summed over collected submissions
    counts: dict = field(default_factory=dict)  # label -> commands timed


@dataclass(eq=False)
class Ticket:
    """One submission in flight (``Device.submit(..., wait=False)``); ``Device.wait`` it exactly once."""

    fence: object
    fences: object  # VkFence[1] for the C calls
    waited: bool = False


class Recordings:
    """Recording and submission methods of ``Device`` (see the module docstring)."""

    def begin_recording(self, profile: bool = False) -> None:
        """Record the following commands into a new command buffer that ``end_recording`` returns for
        ``submit``. Pending work is flushed first. Inside, nothing may upload through the staging arena or
        submit (both raise): what changes between submissions must be read by the shaders from buffers the host
        writes. The first command is ordered after every earlier compute or transfer command on the queue.
        ``profile``: a timestamp after every command (see the module docstring)."""
        if self.capturing:
            raise LlmoptError("begin_recording: a recording is already open")
        if profile and not self.features["timestamps"]:
            raise LlmoptError(f"Vulkan device '{self.info['name']}' has no timestamp queries on its compute queue: "
                              "a profiled recording cannot be timed")
        self.flush()
        vk = self.vk
        cmd = vk.vkAllocateCommandBuffers(self.device, vk.VkCommandBufferAllocateInfo(
            commandPool=self.command_pool, level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1))[0]
        vk.vkBeginCommandBuffer(cmd, vk.VkCommandBufferBeginInfo(flags=vk.VK_COMMAND_BUFFER_USAGE_SIMULTANEOUS_USE_BIT))
        self._saved_cmd, self.cmd = self.cmd, cmd
        self.capturing = Recording(cmd, self.n_commands)
        if profile:
            pool = vk.vkCreateQueryPool(self.device, vk.VkQueryPoolCreateInfo(
                queryType=vk.VK_QUERY_TYPE_TIMESTAMP, queryCount=MAX_TIMESTAMPS), None)
            self.capturing.query_pool, self.capturing.labels = pool, ["start"]
            self.lib.vkCmdResetQueryPool(cmd, pool, 0, MAX_TIMESTAMPS)
            self.lib.vkCmdWriteTimestamp(cmd, vk.VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, pool, 0)
        self.recording = True
        self._last_stage = "any"  # a barrier before the first command: everything submitted before it

    def end_recording(self) -> Recording:
        """Close the open recording (its writes made visible to the host at the end) and return it."""
        rec = self.capturing
        if rec is None:
            raise LlmoptError("end_recording: no recording is open")
        self._barrier("host")
        self.vk.vkEndCommandBuffer(rec.cmd)
        self._restore()
        rec.n_commands = self.n_commands - rec.n_commands
        return rec

    def abort_recording(self) -> None:
        """Drop the open recording (after an error inside it); normal recording continues."""
        rec = self.capturing
        if rec is not None:
            self.vk.vkEndCommandBuffer(rec.cmd)
            self._restore()
            self.free_recording(rec)

    def _restore(self) -> None:
        self.cmd, self._saved_cmd = self._saved_cmd, None
        self.capturing, self.recording, self._last_stage = None, False, None

    def submit(self, recordings: tuple[Recording, ...], times: int = 1, wait: bool = True) -> Ticket | None:
        """Run ``recordings`` in order as one submission, ``times`` times back to back. ``wait``: wait for the last;
        otherwise return its ``Ticket`` for ``wait`` (the host may write what the next submission reads meanwhile,
        but not what this one still reads)."""
        if self.capturing:
            raise LlmoptError("submit while recording a replayable step")
        self.flush()  # work recorded before goes first
        hit = self._submits.get(recordings)
        if hit is None:
            cmds = self.ffi.new("VkCommandBuffer[]", [r.cmd for r in recordings])
            info = self.ffi.new("VkSubmitInfo*", {"sType": self.vk.VK_STRUCTURE_TYPE_SUBMIT_INFO,
                                                  "commandBufferCount": len(recordings), "pCommandBuffers": cmds})
            hit = self._submits[recordings] = (info, cmds)  # cmds lives as long as the info pointing at it
        info = hit[0]
        ticket = self._idle_tickets.pop() if self._idle_tickets else self._new_ticket()
        lib, null = self.lib, self.ffi.NULL
        for i in range(times):
            status = lib.vkQueueSubmit(self.queue, 1, info, ticket.fence if i == times - 1 else null)
            if status != 0:
                self._idle_tickets.append(ticket)
                raise LlmoptError(f"Vulkan device '{self.info['name']}': vkQueueSubmit failed (VkResult {status})")
        ticket.waited = False
        if not wait:
            return ticket
        self.wait(ticket)
        return None

    def wait(self, ticket: Ticket) -> None:
        """Wait until the submission of ``ticket`` (and so every earlier one) has run; the ticket is spent."""
        if ticket.waited:
            raise LlmoptError("wait: this submission was already waited for")
        lib = self.lib
        status = lib.vkWaitForFences(self.device, 1, ticket.fences, 1, 2**63 - 1)
        lib.vkResetFences(self.device, 1, ticket.fences)
        ticket.waited = True
        self._idle_tickets.append(ticket)
        if status != 0:
            raise LlmoptError(f"Vulkan device '{self.info['name']}' failed while running a recorded step "
                              f"(VkResult {status})")
        self._free_deferred()

    def _new_ticket(self) -> Ticket:
        fence = self.vk.vkCreateFence(self.device, self.vk.VkFenceCreateInfo(), None)
        self._all_tickets.append(fence)
        return Ticket(fence, self.ffi.new("VkFence[1]", [fence]), waited=True)

    def _destroy_tickets(self) -> None:
        for fence in self._all_tickets:
            self.vk.vkDestroyFence(self.device, fence, None)
        self._all_tickets, self._idle_tickets = [], []

    def _free_deferred(self) -> None:
        while self._deferred and not self.recording:
            self.free(self._deferred.pop())

    def _stamp(self, label: str) -> None:
        """A timestamp after the command just recorded into the open profiled recording."""
        rec = self.capturing
        if len(rec.labels) >= MAX_TIMESTAMPS:
            raise LlmoptError(f"a profiled recording holds at most {MAX_TIMESTAMPS - 1} commands")
        self.lib.vkCmdWriteTimestamp(self.cmd, self.vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, rec.query_pool,
                                     len(rec.labels))
        rec.labels.append(label)

    def collect(self, rec: Recording) -> None:
        """Add the last submission's command times of profiled ``rec`` to ``rec.times``/``rec.counts`` (call after
        that submission was waited for)."""
        if rec.labels is None:
            raise LlmoptError("collect: the recording was not made with profile=True")
        self._add_timestamps(rec.query_pool, rec.labels, rec.times, rec.counts)

    def free_recording(self, rec: Recording) -> None:
        for key in [k for k in self._submits if rec in k]:
            del self._submits[key]
        if self.device is not None:
            self.vk.vkFreeCommandBuffers(self.device, self.command_pool, 1, [rec.cmd])
            if rec.query_pool is not None:
                self.vk.vkDestroyQueryPool(self.device, rec.query_pool, None)
                rec.query_pool = None
