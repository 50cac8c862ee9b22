/* dirtyguest: multiboot entry, flat GDT, interrupt stubs.
 *
 * QEMU's multiboot loader (-kernel on -M pc) enters _start in 32-bit protected mode
 * with EAX = the multiboot magic and EBX = the multiboot information.  We load our own
 * GDT (the loader's may be anywhere), a stack, and call guest_main(magic, mbi).
 * irq_timer counts PIT ticks (IRQ0 remapped to vector 0x20) and acknowledges the PIC;
 * it is the only interrupt the guest enables, and it exists so that the main loop can
 * sleep in HLT between batches instead of spinning a host CPU.  Any CPU exception
 * records its vector in the status block and halts for good.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003           /* modules page-aligned, memory info wanted */

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .section .text
        .globl _start
_start:
        cli
        mov     $stack_top, %esp
        lgdt    gdt_desc
        ljmp    $0x08, $1f
1:      mov     $0x10, %cx
        mov     %cx, %ds
        mov     %cx, %es
        mov     %cx, %ss
        mov     %cx, %fs
        mov     %cx, %gs
        push    %ebx
        push    %eax
        call    guest_main
2:      cli
        hlt
        jmp     2b

        .globl irq_timer
irq_timer:
        push    %eax
        incl    timer_ticks
        mov     $0x20, %al
        outb    %al, $0x20                  /* EOI to the master PIC */
        pop     %eax
        iret

        .globl irq_spurious
irq_spurious:
        iret                                /* masked lines only: nothing to acknowledge */

        /* exception stubs: vector number into EAX, then the common fault path */
        .macro EXC n
        .globl exc_\n
exc_\n: mov     $\n, %eax
        jmp     fault
        .endm
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        EXC \n
        .endr
fault:  cli
        push    %eax
        call    guest_fault                 /* records the vector in the status block */
3:      hlt
        jmp     3b

        .section .rodata
        .align 8
gdt:    .quad   0
        .quad   0x00CF9A000000FFFF          /* 0x08: code, flat 4 GiB */
        .quad   0x00CF92000000FFFF          /* 0x10: data, flat 4 GiB */
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt

        .section .note.GNU-stack, "", @progbits

        .section .bss
        .align 16
        .globl timer_ticks
timer_ticks:
        .long   0
        .space  16384
stack_top:
