# The guest program of `shmdirty migrate --guest kvm`: 64-bit user mode (CPL 3),
# the only mode this machine's KVM runs natively.  One copy runs on every vCPU.
#
# Assembled bytes live in workers/guest_kvm.py (CODE); tests/test_guest_kvm.py
# re-assembles this file with binutils and compares:
#     as --64 -o guest.o guest_kvm.S && objcopy -O binary -j .text guest.o guest.bin
# The code is position independent and loaded at guest address 0x2000.
#
# Entry: rdi = this vCPU's parameter block (guest address; identity-mapped).
# Parameter block (256 bytes each, offsets below; written by the VM owner):
#   +0   pattern   0 random page writes, 1 sequential copy/scale sweep, 2 hot set
#   +8   steps     writes (random, hot) or passes (sequential) to do
#   +16  seed      first LCG state
#   +24  hot       pages in the hot set (pattern 2)
#   +32  nregions  entries used in the region table
#   +40  step      progress: steps done so far (the guest stores it every step)
#   +48  checksum  the guest's result, stored before it says done
#   +56  hotplug   4 steps (u64, increasing; 0 = none) at which to ask for a hot-add
#   +88  spin      LCG iterations per step of the random and hot patterns (>= 1)
#   +96  regions   up to 8 x (first guest page, pages): this vCPU's RAM, in order
#   +224 answered  hot-add requests the VM owner answered (made or refused; the
#                  program never reads it: a refused one leaves nregions as is)
#
# Step n (0-based) of the random and hot patterns (the LCG runs `spin` times,
# so a step costs time, not memory traffic; the model jumps ahead instead):
#   x   = x * 6364136223846793005 + 1442695040888963407   (mod 2^64; Knuth's MMIX LCG)
#   i   = ((x >> 32) * N) >> 32        N = pages of all regions (hot: min(hot, that))
#   p   = the i-th page of the concatenated regions
#   the u64 at p * 4096 + ((x >> 23) & 511) * 8 += x
# Pass n of the sequential pattern, for every region of P pages, a = its first
# P/2 pages and b = the next P/2 (as u64 arrays):
#   n even (copy):  b[j] = a[j] + x + n + B      (B: the guest address of b[j];
#                                                  x: the seed, unchanged)
#   n odd (scale):  a[j] = b[j] * 3
# Before step n == hotplug[k] the guest does `out 0x10, al` with al = k: the
# VM owner hot-adds RAM (if not done yet), appends this vCPU's share of it to
# the region table, then the guest re-reads the table.
# After the last step: checksum = sum over every u64 q at guest address A of
# its regions of q * ((A >> 3) | 1) (mod 2^64), stored at +48 and left in rax
# and rbx, then `out 0x11, al` (done); a done vCPU that runs again says done again.

        .intel_syntax noprefix
        .code64
        .text
        .globl _start

        .set P_PATTERN, 0
        .set P_STEPS, 8
        .set P_SEED, 16
        .set P_HOT, 24
        .set P_NREG, 32
        .set P_STEP, 40
        .set P_CHECKSUM, 48
        .set P_HOTPLUG, 56
        .set P_SPIN, 88
        .set P_REGIONS, 96
        .set MAX_HOTPLUG, 4
        .set PORT_HOTPLUG, 0x10
        .set PORT_DONE, 0x11

# r15 params, r14 x, r13 step, r12 steps, r11 LCG multiplier, r10 next
# hot-add step (-1: none), r9 hot-adds done, r8 LCG increment, rbx N
_start:
        mov     r15, rdi
        mov     r14, [r15 + P_SEED]
        mov     r12, [r15 + P_STEPS]
        xor     r13, r13
        xor     r9, r9
        movabs  r11, 6364136223846793005
        movabs  r8, 1442695040888963407

refresh:                                # after boot and after each hot-add
        mov     r10, -1
        cmp     r9, MAX_HOTPLUG
        jae     1f
        mov     rax, [r15 + P_HOTPLUG + r9 * 8]
        test    rax, rax
        jz      1f
        mov     r10, rax
1:      xor     rbx, rbx                # N = sum of the regions' pages
        mov     rcx, [r15 + P_NREG]
        lea     rsi, [r15 + P_REGIONS]
2:      test    rcx, rcx
        jz      3f
        add     rbx, [rsi + 8]
        add     rsi, 16
        dec     rcx
        jmp     2b
3:      cmp     qword ptr [r15 + P_PATTERN], 2
        jne     loop
        mov     rax, [r15 + P_HOT]      # hot set: N = min(hot, N)
        cmp     rax, rbx
        jae     loop
        mov     rbx, rax

loop:
        cmp     r13, r12
        jae     finish
        cmp     r13, r10
        je      hotadd
        cmp     qword ptr [r15 + P_PATTERN], 1
        je      sweep

        mov     rcx, [r15 + P_SPIN]     # random and hot: spin, then one page write
14:     imul    r14, r11
        add     r14, r8
        dec     rcx
        jnz     14b
        mov     rax, r14
        shr     rax, 32
        imul    rax, rbx
        shr     rax, 32                 # i in [0, N)
        lea     rsi, [r15 + P_REGIONS]
4:      mov     rcx, [rsi + 8]
        cmp     rax, rcx
        jb      5f
        sub     rax, rcx
        add     rsi, 16
        jmp     4b
5:      add     rax, [rsi]
        shl     rax, 12
        mov     rcx, r14
        shr     rcx, 23
        and     ecx, 511
        add     [rax + rcx * 8], r14
        jmp     next

sweep:                                  # sequential: one pass over every region
        lea     rbx, [r13 + r14]
        lea     rsi, [r15 + P_REGIONS]
        mov     rcx, [r15 + P_NREG]
6:      test    rcx, rcx
        jz      next
        mov     rax, [rsi]
        shl     rax, 12                 # a
        mov     rdx, [rsi + 8]
        shr     rdx, 1
        shl     rdx, 12                 # bytes in half a region
        lea     rdi, [rax + rdx]        # b
        test    r13, 1
        jnz     8f
7:      test    rdx, rdx                # copy: b[j] = a[j] + x + n + B
        jz      9f
        mov     rbp, [rax]
        add     rbp, rbx
        add     rbp, rdi
        mov     [rdi], rbp
        add     rax, 8
        add     rdi, 8
        sub     rdx, 8
        jmp     7b
8:      test    rdx, rdx                # scale: a[j] = b[j] * 3
        jz      9f
        mov     rbp, [rdi]
        lea     rbp, [rbp + rbp * 2]
        mov     [rax], rbp
        add     rax, 8
        add     rdi, 8
        sub     rdx, 8
        jmp     8b
9:      add     rsi, 16
        dec     rcx
        jmp     6b

next:
        inc     r13
        mov     [r15 + P_STEP], r13
        jmp     loop

hotadd:
        mov     eax, r9d
        out     PORT_HOTPLUG, al
        inc     r9
        jmp     refresh

finish:                                 # checksum of this vCPU's RAM
        xor     rbx, rbx
        mov     rcx, [r15 + P_NREG]
        lea     rsi, [r15 + P_REGIONS]
10:     test    rcx, rcx
        jz      12f
        mov     rdi, [rsi]
        shl     rdi, 12
        mov     rdx, [rsi + 8]
        shl     rdx, 12
        add     rdx, rdi
11:     cmp     rdi, rdx
        jae     13f
        mov     rax, rdi
        shr     rax, 3
        or      rax, 1
        imul    rax, [rdi]
        add     rbx, rax
        add     rdi, 8
        jmp     11b
13:     add     rsi, 16
        dec     rcx
        jmp     10b
12:     mov     [r15 + P_CHECKSUM], rbx
        mov     rax, rbx
done:
        out     PORT_DONE, al
        jmp     done
