"""Vulkan runtime through the ``vulkan`` package (cffi): probe, device, buffers, pipelines, command recording.

    python -m llmopt.backends.vulkan.device      # prints the probe record of this machine's Vulkan device

``Device`` owns one logical device and queue. Work is recorded lazily into one command buffer (a memory
barrier between consecutive commands, so buffers can be reused in recording order) and submitted by ``flush()``, which
waits for it. Hot-path commands call the C entry points (``vulkan.lib``) directly; the package's Python
wrappers are used only for setup. Buffers are device-local; uploads go through a host-visible staging arena
recorded into the same command buffer; readbacks through a host-visible (cached where offered) buffer.
Pipelines are cached per (shader, specialization constants) and descriptor sets per (pipeline, bindings).
With ``profile=True`` a timestamp is written after every dispatch and ``kernel_times`` sums them per kernel;
``begin_recording``/``end_recording`` keep a command buffer for good (a ``Recording``) and ``submit`` runs a
sequence of them per call, waited for or not (``llmopt.backends.vulkan.recording``): the replayed decode step
(``llmopt.backends.vulkan.replay``) is one.
FACTS §6 lists the package's quirks this module works around (no VK_API_VERSION constants, list-returning
vkCreateComputePipelines, dangling mapped views).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmopt.backends.vulkan.recording import MAX_TIMESTAMPS, Recording, Recordings
from llmopt.errors import LlmoptError

MIN_API = (1, 1)
PUSH_BYTES = 128
INT_DOT_EXTENSION = "VK_KHR_shader_integer_dot_product"
CLOCK_EXTENSION = "VK_KHR_shader_clock"  # rope_attention_clock.comp's phase stamps (VulkanBackend.attn_clock)
SM_EXTENSION = "VK_NV_shader_sm_builtins"  # its properties: the SM count (sandwich grid residency)


def _vk():
    try:
        import vulkan
    except (ImportError, OSError) as err:  # OSError: the package loads libvulkan.so.1 at import
        raise LlmoptError(f"the Vulkan loader or the 'vulkan' Python package is unavailable ({err})") from None
    return vulkan


def _instance(vk, layers: list[str] | None = None):
    app = vk.VkApplicationInfo(pApplicationName="llmopt", apiVersion=vk.VK_MAKE_VERSION(1, 2, 0))
    info = vk.VkInstanceCreateInfo(pApplicationInfo=app, ppEnabledLayerNames=layers or None,
                                   enabledLayerCount=len(layers or []))
    try:
        return vk.vkCreateInstance(info, None)
    except vk.VkError as err:
        raise LlmoptError(f"vkCreateInstance failed ({type(err).__name__}): no usable Vulkan driver (ICD)") from None


def _describe(vk, pd) -> dict:
    """Device facts and features of one physical device (a probe's ``device`` and ``features``)."""
    ffi = vk.ffi
    props = vk.vkGetPhysicalDeviceProperties(pd)
    sg = ffi.new("VkPhysicalDeviceSubgroupProperties*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES})
    p2 = ffi.new("VkPhysicalDeviceProperties2*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, "pNext": sg})
    vk.lib.vkGetPhysicalDeviceProperties2(pd, p2)
    s16 = ffi.new("VkPhysicalDevice16BitStorageFeatures*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_16BIT_STORAGE_FEATURES})
    idot = ffi.new("VkPhysicalDeviceShaderIntegerDotProductFeatures*",
                   {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_FEATURES, "pNext": s16})
    clock = ffi.new("VkPhysicalDeviceShaderClockFeaturesKHR*",
                    {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_CLOCK_FEATURES_KHR, "pNext": idot})
    f2 = ffi.new("VkPhysicalDeviceFeatures2*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, "pNext": clock})
    vk.lib.vkGetPhysicalDeviceFeatures2(pd, f2)
    extensions = {e.extensionName for e in vk.vkEnumerateDeviceExtensionProperties(pd, None)}
    # Packed 4x8-bit dot products (matvec_quant_idot.comp): the feature through the extension
    # (our instance asks for Vulkan 1.2, so the 1.3 core feature alone does not count), and whether the driver
    # runs the signed packed dot as one instruction ("accelerated") rather than emulating it.
    has_idot = bool(idot.shaderIntegerDotProduct) and INT_DOT_EXTENSION in extensions
    idot_props = ffi.new("VkPhysicalDeviceShaderIntegerDotProductProperties*",
                         {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_PROPERTIES})
    if has_idot:
        vk.lib.vkGetPhysicalDeviceProperties2(pd, ffi.new("VkPhysicalDeviceProperties2*", {
            "sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, "pNext": idot_props}))
    # SMs (NVIDIA): how many workgroups are surely resident at once, one an SM (the sandwich grid wait's bound)
    sms = ffi.new("VkPhysicalDeviceShaderSMBuiltinsPropertiesNV*",
                  {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_SM_BUILTINS_PROPERTIES_NV})
    if SM_EXTENSION in extensions:
        vk.lib.vkGetPhysicalDeviceProperties2(pd, ffi.new("VkPhysicalDeviceProperties2*", {
            "sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, "pNext": sms}))
    mem = vk.vkGetPhysicalDeviceMemoryProperties(pd)
    heaps = [mem.memoryHeaps[i] for i in range(mem.memoryHeapCount)]
    local = sum(h.size for h in heaps if h.flags & vk.VK_MEMORY_HEAP_DEVICE_LOCAL_BIT)
    queues = vk.vkGetPhysicalDeviceQueueFamilyProperties(pd)
    compute_q = [i for i, q in enumerate(queues) if q.queueFlags & vk.VK_QUEUE_COMPUTE_BIT]
    lim = props.limits
    kinds = {vk.VK_PHYSICAL_DEVICE_TYPE_CPU: "cpu", vk.VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: "discrete_gpu",
             vk.VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: "integrated_gpu", vk.VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: "virtual_gpu"}
    api = (props.apiVersion >> 22, (props.apiVersion >> 12) & 0x3FF, props.apiVersion & 0xFFF)
    compute_stage = bool(sg.supportedStages & vk.VK_SHADER_STAGE_COMPUTE_BIT)
    device = {
        "name": props.deviceName if isinstance(props.deviceName, str) else ffi.string(props.deviceName).decode(),
        "type": kinds.get(props.deviceType, "other"),
        "vendor_id": props.vendorID,
        "api_version": ".".join(map(str, api)),
        "driver_version": props.driverVersion,
        "device_local_bytes": local,
        "subgroup_size": sg.subgroupSize,
        "max_workgroup_invocations": lim.maxComputeWorkGroupInvocations,
        "max_shared_memory_bytes": lim.maxComputeSharedMemorySize,
        "max_storage_buffer_range": lim.maxStorageBufferRange,
        "max_push_constants_bytes": lim.maxPushConstantsSize,
        "min_storage_buffer_offset_alignment": lim.minStorageBufferOffsetAlignment,
        "timestamp_period_ns": lim.timestampPeriod,
        "compute_queue_families": compute_q,
        "timestamp_valid_bits": queues[compute_q[0]].timestampValidBits if compute_q else 0,
        "sm_count": int(sms.shaderSMCount) if SM_EXTENSION in extensions else 0,  # 0: not known
    }
    features = {
        "subgroup_arithmetic": compute_stage and bool(sg.supportedOperations & vk.VK_SUBGROUP_FEATURE_ARITHMETIC_BIT),
        "storage_buffer_16bit": bool(s16.storageBuffer16BitAccess),
        "shader_int64": bool(f2.features.shaderInt64),
        "timestamps": bool(compute_q) and queues[compute_q[0]].timestampValidBits > 0,
        "integer_dot_product": has_idot,
        "integer_dot_4x8_signed_accelerated": has_idot and bool(idot_props.integerDotProduct4x8BitPackedSignedAccelerated),
        # the realtime (device-wide) and subgroup (per-SM cycle) shader clocks, both used by the phase stamps
        "shader_clock": CLOCK_EXTENSION in extensions and bool(clock.shaderDeviceClock and clock.shaderSubgroupClock),
    }
    return {"api": api, "device": device, "features": features}


def _missing(facts: dict) -> str | None:
    """Why this device cannot run our shaders, or None."""
    d = facts["device"]
    if tuple(facts["api"][:2]) < MIN_API:
        return f"Vulkan {d['api_version']} is older than the 1.1 our SPIR-V targets"
    if not d["compute_queue_families"]:
        return "no queue family supports compute"
    if d["max_push_constants_bytes"] < PUSH_BYTES:
        return f"push constants limited to {d['max_push_constants_bytes']} bytes (need {PUSH_BYTES})"
    if d["max_shared_memory_bytes"] < 8192:
        return f"only {d['max_shared_memory_bytes']} bytes of shared memory per workgroup (need 8192)"
    return None


def _pick(vk, instance):
    devices = vk.vkEnumeratePhysicalDevices(instance)
    if not devices:
        raise LlmoptError("no Vulkan physical device found (no GPU driver, and no lavapipe: apt mesa-vulkan-drivers)")
    index = int(os.environ.get("LLMOPT_VULKAN_DEVICE", "0"))
    if not 0 <= index < len(devices):
        raise LlmoptError(f"LLMOPT_VULKAN_DEVICE={index} but only {len(devices)} Vulkan device(s) exist")
    return devices[index]


def probe() -> dict:
    """``{"present", "reason", "device", "features"}`` for this machine's Vulkan device; never raises."""
    try:
        vk = _vk()
        instance = _instance(vk)
        try:
            facts = _describe(vk, _pick(vk, instance))
        finally:
            vk.vkDestroyInstance(instance, None)
    except LlmoptError as err:
        return {"present": False, "reason": str(err), "device": {}, "features": {}}
    why = _missing(facts)
    return {"present": why is None, "reason": why or "ok", "device": facts["device"], "features": facts["features"]}


@dataclass(eq=False)
class Buffer:
    """A VkBuffer with its own memory; ``mapped`` is a persistent host view for host-visible buffers."""

    handle: object
    memory: object
    nbytes: int
    host: bool = False
    mapped: object = None
    pointer: object = None

    def view(self, dtype=np.uint8, count: int | None = None, offset: int = 0) -> np.ndarray:
        return np.frombuffer(self.mapped, dtype=dtype, count=-1 if count is None else count, offset=offset)


@dataclass
class Pipeline:
    name: str
    handle: object
    layout: object
    set_layout: object
    n_bindings: int
    spec: tuple = ()
    descriptor_sets: dict = field(default_factory=dict)


class Device(Recordings):
    """One Vulkan device and queue; see the module docstring."""

    def __init__(self, spv_dir: Path, spec: dict, profile: bool = False, layers: list[str] | None = None):
        vk = self.vk = _vk()
        self.ffi, self.lib = vk.ffi, vk.lib
        self.spv_dir = Path(spv_dir)
        self.spec = spec
        self.instance = _instance(vk, layers)
        self.physical = _pick(vk, self.instance)
        facts = _describe(vk, self.physical)
        why = _missing(facts)
        if why:
            raise LlmoptError(f"Vulkan device '{facts['device']['name']}' cannot run llmopt's shaders: {why}")
        self.info, self.features = facts["device"], facts["features"]
        self.max_range = int(self.info["max_storage_buffer_range"])
        self.align = max(4, int(self.info["min_storage_buffer_offset_alignment"]))
        family = self.info["compute_queue_families"][0]
        qinfo = vk.VkDeviceQueueCreateInfo(queueFamilyIndex=family, queueCount=1, pQueuePriorities=[1.0])
        extensions, chain = [], self.ffi.NULL
        if self.features["integer_dot_product"]:  # matvec_quant_idot declares the capability
            extensions.append(INT_DOT_EXTENSION)
            chain = self.ffi.new("VkPhysicalDeviceShaderIntegerDotProductFeatures*", {
                "sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_FEATURES,
                "shaderIntegerDotProduct": 1})
        if self.features["shader_clock"]:  # rope_attention_clock (a profiling build) declares it
            extensions.append(CLOCK_EXTENSION)
            idot_chain = chain  # kept referenced until the device exists (cffi does not follow pNext)
            chain = self.ffi.new("VkPhysicalDeviceShaderClockFeaturesKHR*", {
                "sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_CLOCK_FEATURES_KHR, "pNext": idot_chain,
                "shaderSubgroupClock": 1, "shaderDeviceClock": 1})
        self.device = vk.vkCreateDevice(self.physical, vk.VkDeviceCreateInfo(
            pNext=chain, pQueueCreateInfos=[qinfo], queueCreateInfoCount=1,
            ppEnabledExtensionNames=extensions or None, enabledExtensionCount=len(extensions)), None)
        self.queue = vk.vkGetDeviceQueue(self.device, family, 0)
        self.command_pool = vk.vkCreateCommandPool(self.device, vk.VkCommandPoolCreateInfo(
            flags=vk.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, queueFamilyIndex=family), None)
        self.cmd = vk.vkAllocateCommandBuffers(self.device, vk.VkCommandBufferAllocateInfo(
            commandPool=self.command_pool, level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1))[0]
        self.fence = vk.vkCreateFence(self.device, vk.VkFenceCreateInfo(), None)
        self._memory_types()
        self.descriptor_pools: list = []
        self._pool_room: dict[int, int] = {}  # id(pool) -> descriptor sets it can still give
        self._sets_of: dict[int, dict] = {}  # id(buffer) -> {(id(pipeline), bindings): (pipeline, pool)} binding it
        self._deferred: list[Buffer] = []  # freed while commands were being recorded: released after the submit
        self.pipelines: dict = {}
        self.modules: dict = {}
        self.recording = False
        self.capturing: Recording | None = None  # set between begin_recording and end_recording
        self.chain = None  # a chain.Chain while a replayed step's body is recorded chained
        self._saved_cmd = None
        self._submits: dict = {}  # tuple of Recordings -> (VkSubmitInfo*, its command-buffer array)
        self._all_tickets: list = []  # fences of submissions waited for later (recording.Ticket)
        self._idle_tickets: list = []
        self.n_commands = 0
        self.bytes_allocated = 0
        self._live: dict[int, Buffer] = {}  # every buffer not yet freed: close() frees them all
        self.staging = self.buffer(1 << 24, host=True)
        self.staging_used = 0
        self.readback = self.buffer(1 << 20, host=True, cached=True)
        # Barriers go between consecutive commands, from the stage of the one before to the stage of this one
        # (compute->compute between dispatches, the common case), and to the host before a submit.
        stage = {"compute": vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, "transfer": vk.VK_PIPELINE_STAGE_TRANSFER_BIT,
                 "host": vk.VK_PIPELINE_STAGE_HOST_BIT}
        writes = {"compute": vk.VK_ACCESS_SHADER_WRITE_BIT, "transfer": vk.VK_ACCESS_TRANSFER_WRITE_BIT}
        uses = {"compute": vk.VK_ACCESS_SHADER_READ_BIT | vk.VK_ACCESS_SHADER_WRITE_BIT,
                "transfer": vk.VK_ACCESS_TRANSFER_READ_BIT | vk.VK_ACCESS_TRANSFER_WRITE_BIT,
                "host": vk.VK_ACCESS_HOST_READ_BIT}
        self._barriers = {
            (a, b): (stage[a], stage[b], self.ffi.new("VkMemoryBarrier*", {
                "sType": vk.VK_STRUCTURE_TYPE_MEMORY_BARRIER, "srcAccessMask": writes[a], "dstAccessMask": uses[b]}))
            for a in ("compute", "transfer") for b in ("compute", "transfer", "host")}
        # the first command of a recording: after every compute or transfer write submitted before it
        for b in ("compute", "transfer", "host"):
            barrier = self.ffi.new("VkMemoryBarrier*", {
                "sType": vk.VK_STRUCTURE_TYPE_MEMORY_BARRIER, "srcAccessMask": writes["compute"] | writes["transfer"],
                "dstAccessMask": uses[b]})
            self._barriers[("any", b)] = (stage["compute"] | stage["transfer"], stage[b], barrier)
        self._last_stage: str | None = None
        self.profile = profile and self.features["timestamps"]
        self.kernel_times: dict[str, float] = {}
        self.kernel_counts: dict[str, int] = {}
        self._stamps: list[str] = []
        if self.profile:
            self.query_pool = vk.vkCreateQueryPool(self.device, vk.VkQueryPoolCreateInfo(
                queryType=vk.VK_QUERY_TYPE_TIMESTAMP, queryCount=MAX_TIMESTAMPS), None)

    # --- memory ---------------------------------------------------------------------------------------
    def _memory_types(self) -> None:
        vk = self.vk
        mem = vk.vkGetPhysicalDeviceMemoryProperties(self.physical)
        self._types = [(mem.memoryTypes[i].propertyFlags, mem.memoryTypes[i].heapIndex) for i in range(mem.memoryTypeCount)]
        self.heap_bytes = [mem.memoryHeaps[i].size for i in range(mem.memoryHeapCount)]

    def _type_index(self, bits: int, want: int, prefer: int = 0) -> int:
        candidates = [i for i, (flags, _) in enumerate(self._types) if bits & (1 << i) and flags & want == want]
        if not candidates:
            raise LlmoptError(f"Vulkan device '{self.info['name']}' has no memory type with flags {want:#x}")
        preferred = [i for i in candidates if self._types[i][0] & prefer == prefer]
        return (preferred or candidates)[0]

    def buffer(self, nbytes: int, host: bool = False, cached: bool = False, name: str = "buffer") -> Buffer:
        """A storage buffer of ``nbytes`` (device-local, or host-visible and persistently mapped)."""
        vk = self.vk
        nbytes = max(16, (int(nbytes) + 15) // 16 * 16)
        usage = (vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT
                 | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT)
        oom = (vk.VkErrorOutOfDeviceMemory, vk.VkErrorOutOfHostMemory)
        try:
            handle = vk.vkCreateBuffer(self.device, vk.VkBufferCreateInfo(
                size=nbytes, usage=usage, sharingMode=vk.VK_SHARING_MODE_EXCLUSIVE), None)
        except oom as err:
            raise self._oom(nbytes, name, host, None, err) from None
        req = vk.vkGetBufferMemoryRequirements(self.device, handle)
        if host:
            want = vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
            prefer = vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT if cached else 0
        else:
            want, prefer = vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, 0
        index = self._type_index(req.memoryTypeBits, want, prefer)
        try:
            memory = vk.vkAllocateMemory(self.device, vk.VkMemoryAllocateInfo(
                allocationSize=req.size, memoryTypeIndex=index), None)
        except oom as err:
            vk.vkDestroyBuffer(self.device, handle, None)
            raise self._oom(nbytes, name, host, index, err) from None
        vk.vkBindBufferMemory(self.device, handle, memory, 0)
        self.bytes_allocated += req.size
        buf = Buffer(handle, memory, nbytes, host)
        self._live[id(buf)] = buf
        if host:
            buf.mapped = vk.vkMapMemory(self.device, memory, 0, nbytes, 0)  # stays mapped: views dangle after unmap
            buf.pointer = self.ffi.from_buffer(buf.mapped)
        return buf

    def _oom(self, nbytes: int, name: str, host: bool, index: int | None, err: Exception) -> LlmoptError:
        heap = f", heap {self.heap_bytes[self._types[index][1]] / 2**20:.0f} MiB" if index is not None else ""
        return LlmoptError(f"out of {'host' if host else 'device'} memory on '{self.info['name']}' allocating "
                           f"{nbytes / 2**20:.1f} MiB for {name} ({self.bytes_allocated / 2**20:.0f} MiB already "
                           f"allocated{heap}; {type(err).__name__})")

    def free(self, buf: Buffer) -> None:
        """Release ``buf`` and the descriptor sets that bind it; while commands are being recorded (they may use
        it) the release waits for the next submission to finish."""
        if self.device is None or id(buf) not in self._live:
            return
        if self.recording:
            self._deferred.append(buf)
            return
        for (_, key), (pipe, pool) in self._sets_of.pop(id(buf), {}).items():
            self.lib.vkFreeDescriptorSets(self.device, pool, 1, pipe.descriptor_sets.pop(key))
            self._pool_room[id(pool)] += 1
            for other, _, _ in key:  # the set is gone for the other buffers it bound too
                self._sets_of.get(id(other), {}).pop((id(pipe), key), None)
        if buf.host:
            self.vk.vkUnmapMemory(self.device, buf.memory)
        self.vk.vkDestroyBuffer(self.device, buf.handle, None)
        self.vk.vkFreeMemory(self.device, buf.memory, None)
        self.bytes_allocated -= buf.nbytes
        del self._live[id(buf)]

    # --- transfers --------------------------------------------------------------------------------------
    def upload(self, dst: Buffer, data: np.ndarray, dst_offset: int = 0) -> None:
        """Record a copy of host ``data`` into ``dst`` (through the staging arena; large data in chunks)."""
        if self.capturing:  # the staging arena is reused by the next submission: a replay would copy stale bytes
            raise LlmoptError("upload while recording a replayable step: per-step data must come from the step buffer")
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        done = 0
        while done < raw.size:
            room = self.staging.nbytes - self.staging_used
            if room < min(raw.size - done, 1 << 16):
                self.flush()
                room = self.staging.nbytes
            n = min(room, raw.size - done)
            self.ffi.memmove(self.staging.pointer + self.staging_used, raw[done:done + n], n)
            self.copy(self.staging, dst, n, self.staging_used, dst_offset + done)
            self.staging_used += (n + 15) // 16 * 16
            done += n

    def download(self, src: Buffer, nbytes: int, dtype=np.float32, src_offset: int = 0) -> np.ndarray:
        """Submit everything recorded, then copy ``nbytes`` of ``src`` back to the host."""
        if nbytes > self.readback.nbytes:
            self.flush()
            self.free(self.readback)
            self.readback = self.buffer(max(nbytes, 2 * self.readback.nbytes), host=True, cached=True, name="readback")
        self.copy(src, self.readback, nbytes, src_offset, 0)
        self.flush()
        return self.readback.view(dtype, nbytes // np.dtype(dtype).itemsize).copy()

    def copy(self, src: Buffer, dst: Buffer, nbytes: int, src_offset: int = 0, dst_offset: int = 0) -> None:
        self._begin()
        self._barrier("transfer")
        region = self.ffi.new("VkBufferCopy*", {"srcOffset": src_offset, "dstOffset": dst_offset, "size": nbytes})
        self.lib.vkCmdCopyBuffer(self.cmd, src.handle, dst.handle, 1, region)
        self._after("transfer")  # vkCmdCopyBuffer; "copy" is the copy shader

    # --- pipelines and dispatch -------------------------------------------------------------------------
    def pipeline(self, name: str, n_bindings: int, spec: tuple[int, ...]) -> Pipeline:
        key = (name, spec)
        if key in self.pipelines:
            return self.pipelines[key]
        vk, ffi = self.vk, self.ffi
        if name not in self.modules:
            spv = self.spv_dir / f"{name}.spv"
            if not spv.exists():
                raise LlmoptError(f"{spv}: SPIR-V for shader '{name}' is missing; rerun the compile stage")
            code = spv.read_bytes()
            self.modules[name] = vk.vkCreateShaderModule(self.device, vk.VkShaderModuleCreateInfo(
                codeSize=len(code), pCode=code), None)
        bindings = [vk.VkDescriptorSetLayoutBinding(binding=i, descriptorType=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                                    descriptorCount=1, stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT)
                    for i in range(n_bindings)]
        set_layout = vk.vkCreateDescriptorSetLayout(self.device, vk.VkDescriptorSetLayoutCreateInfo(
            bindingCount=n_bindings, pBindings=bindings), None)
        push = vk.VkPushConstantRange(stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT, offset=0, size=PUSH_BYTES)
        layout = vk.vkCreatePipelineLayout(self.device, vk.VkPipelineLayoutCreateInfo(
            setLayoutCount=1, pSetLayouts=[set_layout], pushConstantRangeCount=1, pPushConstantRanges=[push]), None)
        values = ffi.new("uint32_t[]", list(spec) or [0])
        entries = [vk.VkSpecializationMapEntry(constantID=i, offset=4 * i, size=4) for i in range(len(spec))]
        spec_info = vk.VkSpecializationInfo(mapEntryCount=len(spec), pMapEntries=entries or None,
                                            dataSize=4 * len(spec), pData=values)
        stage = vk.VkPipelineShaderStageCreateInfo(stage=vk.VK_SHADER_STAGE_COMPUTE_BIT, module=self.modules[name],
                                                   pName="main", pSpecializationInfo=spec_info)
        handle = vk.vkCreateComputePipelines(self.device, None, 1, [vk.VkComputePipelineCreateInfo(
            stage=stage, layout=layout)], None)[0]
        pipe = self.pipelines[key] = Pipeline(name, handle, layout, set_layout, n_bindings, spec)
        return pipe

    def _descriptor_set(self, pipe: Pipeline, bindings: tuple):
        dset = pipe.descriptor_sets.get(bindings)
        if dset is not None:
            return dset
        vk = self.vk
        dset = None
        for pool in reversed(self.descriptor_pools):  # the newest first: older ones have room only where sets were freed
            if self._pool_room[id(pool)] > 0:
                try:
                    dset = vk.vkAllocateDescriptorSets(self.device, vk.VkDescriptorSetAllocateInfo(
                        descriptorPool=pool, descriptorSetCount=1, pSetLayouts=[pipe.set_layout]))
                    break
                except (vk.VkErrorOutOfPoolMemory, vk.VkErrorFragmentedPool):
                    continue
        if dset is None:
            size = vk.VkDescriptorPoolSize(type=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, descriptorCount=4096 * 8)
            pool = vk.vkCreateDescriptorPool(self.device, vk.VkDescriptorPoolCreateInfo(
                flags=vk.VK_DESCRIPTOR_POOL_CREATE_FREE_DESCRIPTOR_SET_BIT, maxSets=4096, poolSizeCount=1,
                pPoolSizes=[size]), None)
            self.descriptor_pools.append(pool)
            self._pool_room[id(pool)] = 4096
            dset = vk.vkAllocateDescriptorSets(self.device, vk.VkDescriptorSetAllocateInfo(
                descriptorPool=pool, descriptorSetCount=1, pSetLayouts=[pipe.set_layout]))
        self._pool_room[id(pool)] -= 1
        for buf, _, _ in bindings:
            self._sets_of.setdefault(id(buf), {})[(id(pipe), bindings)] = (pipe, pool)
        infos = [vk.VkDescriptorBufferInfo(buffer=buf.handle, offset=off, range=rng) for buf, off, rng in bindings]
        writes = [vk.VkWriteDescriptorSet(dstSet=dset[0], dstBinding=i, descriptorCount=1,
                                          descriptorType=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, pBufferInfo=[info])
                  for i, info in enumerate(infos)]
        vk.vkUpdateDescriptorSets(self.device, len(writes), writes, 0, None)
        pipe.descriptor_sets[bindings] = dset
        return dset

    def dispatch(self, pipe: Pipeline, bindings: list, push: bytes, groups: tuple[int, int, int],
                 label: str | None = None) -> None:
        """Record one dispatch. ``bindings``: (Buffer, offset, range) per binding, range None = to the end.
        ``label``: its name in timings (default: the shader's). While ``chain`` is set, a shader with a chained
        build is recorded chained (``llmopt.backends.vulkan.chain``): no barrier after a chained dispatch."""
        if any(g <= 0 for g in groups):
            return
        label = label or pipe.name
        key = tuple((b, o, min(b.nbytes - o, self.max_range) if r is None else r) for b, o, r in bindings)
        for buf, off, rng in key:
            if rng > self.max_range or off % self.align:
                raise LlmoptError(f"{pipe.name}: binding of {rng} bytes at offset {off} exceeds the device's "
                                  f"storage-buffer range {self.max_range} or alignment {self.align}")
        chained = self.chain.variant(pipe, key, push, groups, label) if self.chain is not None else None
        if chained is not None:
            pipe, key, push = chained
        dset = self._descriptor_set(pipe, key)
        self._begin()
        if chained is None or not self.chain.linkable:
            self._barrier("compute")
        lib, cmd = self.lib, self.cmd
        lib.vkCmdBindPipeline(cmd, self.vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipe.handle)
        lib.vkCmdBindDescriptorSets(cmd, self.vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipe.layout, 0, 1, dset, 0, self.ffi.NULL)
        if push:
            lib.vkCmdPushConstants(cmd, pipe.layout, self.vk.VK_SHADER_STAGE_COMPUTE_BIT, 0, len(push), push)
        lib.vkCmdDispatch(cmd, *groups)
        self._after(label)
        if self.chain is not None:
            self.chain.linkable = chained is not None

    def _barrier(self, stage: str) -> None:
        """Make the previous command's writes visible to a command of ``stage`` and order the two."""
        if self.chain is not None:
            self.chain.linkable = False
        if self._last_stage is not None:
            src, dst, barrier = self._barriers[(self._last_stage, stage)]
            self.lib.vkCmdPipelineBarrier(self.cmd, src, dst, 0, 1, barrier, 0, self.ffi.NULL, 0, self.ffi.NULL)
        self._last_stage = stage if stage != "host" else None

    def _after(self, label: str) -> None:
        self.n_commands += 1
        if self.capturing is not None and self.capturing.labels is not None:
            self._stamp(label)
        elif self.profile and not self.capturing:
            if len(self._stamps) + 1 >= MAX_TIMESTAMPS:
                self.flush()
                self._begin()
            self.lib.vkCmdWriteTimestamp(self.cmd, self.vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, self.query_pool,
                                         len(self._stamps))
            self._stamps.append(label)

    def _begin(self) -> None:
        if self.recording:
            return
        if self.capturing:
            raise LlmoptError("internal: a recording was begun without begin_recording")
        vk = self.vk
        # begin resets the previous recording (pool flag RESET)
        vk.vkBeginCommandBuffer(self.cmd, vk.VkCommandBufferBeginInfo(flags=vk.VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT))
        self.recording = True
        self._last_stage = "any"  # after any submission still in flight (Device.submit(..., wait=False))
        if self.profile:
            self.lib.vkCmdResetQueryPool(self.cmd, self.query_pool, 0, MAX_TIMESTAMPS)
            self.lib.vkCmdWriteTimestamp(self.cmd, vk.VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, self.query_pool, 0)
            self._stamps = ["start"]

    def flush(self) -> None:
        """Submit what is recorded and wait for it; the staging arena is free again afterwards."""
        if not self.recording:
            return
        if self.capturing:
            raise LlmoptError("submit while recording a replayable step: an op inside it reads back or uploads")
        vk = self.vk
        self._barrier("host")
        vk.vkEndCommandBuffer(self.cmd)
        self.recording = False
        submit = vk.VkSubmitInfo(commandBufferCount=1, pCommandBuffers=[self.cmd])
        vk.vkQueueSubmit(self.queue, 1, [submit], self.fence)
        try:
            vk.vkWaitForFences(self.device, 1, [self.fence], vk.VK_TRUE, 2**63 - 1)
        except vk.VkError as err:
            raise LlmoptError(f"Vulkan device '{self.info['name']}' failed while running queued work ({type(err).__name__})") from None
        vk.vkResetFences(self.device, 1, [self.fence])
        self.staging_used = 0
        self._free_deferred()
        if self.profile:
            self._collect_timestamps()

    def _collect_timestamps(self) -> None:
        self._add_timestamps(self.query_pool, self._stamps, self.kernel_times, self.kernel_counts)
        self._stamps = []

    def _add_timestamps(self, pool, labels: list, times: dict, counts: dict) -> None:
        """Add the ms between consecutive timestamps of ``pool`` (``labels[i]`` names timestamp i's command) to
        ``times`` and ``counts`` by label."""
        period = float(self.info["timestamp_period_ns"]) * 1e-6  # ms per tick
        for label, ticks in zip(labels[1:], np.diff(self.timestamp_ticks(pool, len(labels)).astype(np.int64))):
            times[label] = times.get(label, 0.0) + int(ticks) * period
            counts[label] = counts.get(label, 0) + 1

    def timestamp_ticks(self, pool, n: int) -> np.ndarray:
        """The first ``n`` timestamps of query ``pool`` in device ticks (uint64), waiting for them."""
        data = self.ffi.new(f"uint64_t[{n}]")
        self.lib.vkGetQueryPoolResults(self.device, pool, 0, n, 8 * n, data, 8,
                                       self.vk.VK_QUERY_RESULT_64_BIT | self.vk.VK_QUERY_RESULT_WAIT_BIT)
        return np.frombuffer(self.ffi.buffer(data), np.uint64).copy()

    def close(self) -> None:
        """Release every Vulkan object, every buffer included (handles still held must not be used afterwards)."""
        if self.device is None:
            return
        vk = self.vk
        if self.recording:
            self.flush()
        vk.vkDeviceWaitIdle(self.device)
        for pipe in self.pipelines.values():
            vk.vkDestroyPipeline(self.device, pipe.handle, None)
            vk.vkDestroyPipelineLayout(self.device, pipe.layout, None)
            vk.vkDestroyDescriptorSetLayout(self.device, pipe.set_layout, None)
        for module in self.modules.values():
            vk.vkDestroyShaderModule(self.device, module, None)
        for pool in self.descriptor_pools:
            vk.vkDestroyDescriptorPool(self.device, pool, None)
        self._sets_of.clear()
        self._deferred.clear()
        if self.profile:
            vk.vkDestroyQueryPool(self.device, self.query_pool, None)
        for buf in list(self._live.values()):
            self.free(buf)
        vk.vkDestroyFence(self.device, self.fence, None)
        self._destroy_tickets()
        vk.vkDestroyCommandPool(self.device, self.command_pool, None)
        vk.vkDestroyDevice(self.device, None)
        vk.vkDestroyInstance(self.instance, None)
        self.device = None


def pack_push(fmt: str, *values) -> bytes:
    """Push-constant bytes: ``fmt`` in struct notation over 32-bit fields ('I' uint, 'f' float)."""
    return struct.pack("<" + fmt, *values)


if __name__ == "__main__":
    import json

    print(json.dumps(probe(), indent=2))
