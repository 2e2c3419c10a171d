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
"""

from __future__ import annotations

from dataclasses import dataclass

from llmopt.errors import LlmoptError


@dataclass(eq=False)
class Recording:
    """A command buffer recorded once (``Device.begin_recording``/``end_recording``) and submitted many times."""

    cmd: object
    n_commands: int


@dataclass(eq=False)
class Ticket:
    """One submission in flight (``Device.submit(..., wait=False)``); ``Device.wait`` it exactly once."""

    fence: object
    fences: object  # VkFence[1] for the C calls
    waited: bool = False


class Recordings:
    """Recording and submission methods of ``Device`` (see the module docstring)."""

    def begin_recording(self) -> None:
        """Record the following commands into a new command buffer that ``end_recording`` returns for
        ``submit``. Pending work is flushed first. Inside, nothing may upload through the staging arena or
        submit (both raise): what changes between submissions must be read by the shaders from buffers the host
        writes. The first command is ordered after every earlier compute or transfer command on the queue."""
        if self.capturing:
            raise LlmoptError("begin_recording: a recording is already open")
        self.flush()
        vk = self.vk
        cmd = vk.vkAllocateCommandBuffers(self.device, vk.VkCommandBufferAllocateInfo(
            commandPool=self.command_pool, level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1))[0]
        vk.vkBeginCommandBuffer(cmd, vk.VkCommandBufferBeginInfo(flags=vk.VK_COMMAND_BUFFER_USAGE_SIMULTANEOUS_USE_BIT))
        self._saved_cmd, self.cmd = self.cmd, cmd
        self.capturing = Recording(cmd, self.n_commands)
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

    def free_recording(self, rec: Recording) -> None:
        for key in [k for k in self._submits if rec in k]:
            del self._submits[key]
        if self.device is not None:
            self.vk.vkFreeCommandBuffers(self.device, self.command_pool, 1, [rec.cmd])
